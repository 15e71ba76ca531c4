//! Packages for tests: payload directories, a signing key, and packages built from them with
//! the real `fulcrum pkg`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::{Api, Resp, temp_dir};

pub const BIN: &str = env!("CARGO_BIN_EXE_fulcrum");

pub fn fulcrum(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run fulcrum");
    assert!(out.status.success(), "fulcrum {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

pub fn sha256_file(path: &Path) -> String {
    fulcrum_package::hex(&Sha256::digest(std::fs::read(path).unwrap()))
}

/// Payload directories, a signing key, and packages built from them.
pub struct Packages {
    pub dir: tempfile::TempDir,
}

impl Packages {
    pub fn new() -> Packages {
        let dir = temp_dir();
        let root = dir.path();
        for (path, data) in [
            ("controller/bin/fulcrum-controller", "#!/bin/sh\necho controller\n"),
            ("controller/etc/defaults.json", "{}\n"),
            ("se/bin/fulcrum-se", "#!/bin/sh\necho se\n"),
            ("se/hooks/post-install", "#!/bin/sh\nexit 0\n"),
        ] {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        fulcrum(&["pkg", "keygen", "--out", root.join("release").to_str().unwrap()]);
        Packages { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn key(&self) -> String {
        self.path("release.secret").to_string_lossy().into_owned()
    }

    /// A data dir that trusts this key.
    pub fn data_dir(&self) -> tempfile::TempDir {
        let data = temp_dir();
        std::fs::create_dir_all(data.path().join("trusted-keys")).unwrap();
        std::fs::copy(self.path("release.pub"), data.path().join("trusted-keys/release.pub")).unwrap();
        data
    }

    /// Builds `<name>` of a kind; `extra` are more `pkg build` arguments.
    pub fn build(&self, name: &str, kind: &str, version: &str, build: &str, extra: &[&str]) -> PathBuf {
        let out = self.path(name);
        let controller = self.path("controller");
        let se = self.path("se");
        let mut args = vec!["pkg", "build", "--kind", kind, "--version", version, "--build", build];
        args.extend(["--date", "20261122.101500", "-o", out.to_str().unwrap()]);
        if !extra.contains(&"--min-version") {
            args.extend(["--min-version", "30.1.1"]);
        }
        let key = self.key();
        args.extend(["--key", key.as_str()]);
        match kind {
            "controller" | "avi_patch" => {
                args.extend(["--controller-dir", controller.to_str().unwrap(), "--se-dir", se.to_str().unwrap()])
            }
            "controller_docker" => {
                args.extend(["--controller-dir", controller.to_str().unwrap(), "--docker-version", "20.10"])
            }
            "controller_patch" => args.extend(["--controller-dir", controller.to_str().unwrap()]),
            "se_patch" => args.extend(["--se-dir", se.to_str().unwrap()]),
            _ => {}
        }
        if kind.ends_with("patch") {
            args.extend(["--patch", "2p1"]);
        }
        args.extend(extra);
        fulcrum(&args);
        out
    }

    /// A signed composite of a base and optional patches.
    pub fn bundle(&self, name: &str, base: &Path, controller_patch: Option<&Path>, se_patch: Option<&Path>) -> PathBuf {
        let out = self.path(name);
        let key = self.key();
        let mut args = vec!["pkg", "build", "--kind", "bundle", "--base", base.to_str().unwrap()];
        if let Some(cp) = controller_patch {
            args.extend(["--controller-patch", cp.to_str().unwrap()]);
        }
        if let Some(sp) = se_patch {
            args.extend(["--se-patch", sp.to_str().unwrap()]);
        }
        args.extend(["--key", key.as_str(), "-o", out.to_str().unwrap()]);
        fulcrum(&args);
        out
    }
}

impl Packages {
    /// A controller package of `version` whose SE image is `se_files` (path, contents); files
    /// under `bin/` and `hooks/` are executable.
    pub fn with_se(&self, name: &str, version: &str, build: &str, se_files: &[(&str, &str)]) -> PathBuf {
        let se = self.path(&format!("{name}.se"));
        for (path, data) in se_files {
            let p = se.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, data).unwrap();
            if path.starts_with("bin/") || path.starts_with("hooks/") {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        self.controller_package(name, version, build, &self.path("controller"), &se)
    }

    /// A signed controller package of `version` from a controller and an SE payload directory.
    pub fn controller_package(&self, name: &str, version: &str, build: &str, controller: &Path, se: &Path) -> PathBuf {
        let out = self.path(name);
        let key = self.key();
        let (controller, se, target) = (controller.to_str().unwrap(), se.to_str().unwrap(), out.to_str().unwrap());
        fulcrum(&[
            "pkg",
            "build",
            "--kind",
            "controller",
            "--version",
            version,
            "--build",
            build,
            "--date",
            "20261122.101500",
            "--min-version",
            "30.1.1",
            "--controller-dir",
            controller,
            "--se-dir",
            se,
            "--key",
            &key,
            "-o",
            target,
        ]);
        out
    }
}

/// Uploads: the multipart body `curl -F` sends.
pub fn multipart(field: &str, filename: &str, data: &[u8]) -> (String, Vec<u8>) {
    let boundary = "----fulcrum-test-boundary-7c2f";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub fn upload_bytes(api: &Api, data: &[u8]) -> Resp {
    let (content_type, body) = multipart("file", "package.pkg", data);
    api.clone().header("Content-Type", &content_type).send("POST", "/api/image", Some(&body))
}

pub fn upload(api: &Api, path: &Path) -> Resp {
    upload_bytes(api, &std::fs::read(path).unwrap())
}

impl Packages {
    /// A controller package of `version` carrying `mib` MiB that do not compress, so that
    /// moving it takes a while.
    pub fn big_controller(&self, name: &str, version: &str, build: &str, mib: usize) -> PathBuf {
        use std::io::Write;
        let controller = self.path(&format!("{name}.controller"));
        std::fs::create_dir_all(controller.join("lib")).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ mib as u64;
        let mut block = vec![0u8; 1 << 20];
        let mut f = std::io::BufWriter::new(std::fs::File::create(controller.join("lib/blob")).unwrap());
        for _ in 0..mib {
            for chunk in block.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes());
            }
            f.write_all(&block).unwrap();
        }
        f.flush().unwrap();
        self.controller_package(name, version, build, &controller, &self.path("se"))
    }
}
