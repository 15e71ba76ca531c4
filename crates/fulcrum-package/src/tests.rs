//! Building, signing and verifying real archives, and every way a package can be bad.

use std::io::Cursor;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::*;

struct Fixture {
    dir: tempfile::TempDir,
    key: SecretKey,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        for (root, files) in [
            (
                "controller",
                &[
                    ("bin/fulcrum", &b"#!controller"[..]),
                    ("etc/config", b"x = 1"),
                    ("hooks/pre-install", b"#!/bin/sh\n"),
                ][..],
            ),
            ("se", &[("bin/fulcrum-se", &b"#!se"[..])][..]),
        ] {
            for (name, data) in files {
                let path = dir.path().join(root).join(name);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, data).unwrap();
            }
        }
        Fixture { dir, key: SecretKey::generate() }
    }

    fn trusted(&self) -> TrustedKeys {
        TrustedKeys::new(vec![self.key.public()])
    }

    fn spec(&self, kind: PackageKind) -> BuildSpec {
        let has = |roles: &[PackageKind]| roles.contains(&kind);
        use PackageKind::*;
        BuildSpec {
            product: "fulcrum".into(),
            kind,
            version: "30.2.2".into(),
            build: 9100,
            build_date: "20261122.101500".into(),
            patch_version: kind.is_patch().then(|| "2p1".into()),
            min_version: "30.1.1".into(),
            requirements: Requirements {
                controller_free_disk_bytes: 1 << 20,
                se_free_disk_bytes: 1 << 19,
                docker_version: (kind == ControllerDocker).then(|| "20.10".into()),
                cloud_types: vec!["CLOUD_NONE".into()],
            },
            controller_dir: has(&[Controller, ControllerDocker, AviPatch, ControllerPatch])
                .then(|| self.dir.path().join("controller")),
            se_dir: has(&[Controller, AviPatch, SePatch]).then(|| self.dir.path().join("se")),
            components: Vec::new(),
        }
    }

    fn package(&self, kind: PackageKind) -> Vec<u8> {
        let mut out = Vec::new();
        build(&self.spec(kind), Some(&self.key), &mut out).unwrap();
        out
    }

    fn write(&self, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn verify(&self, bytes: &[u8]) -> Result<Verified, PackageError> {
        verify(&mut Cursor::new(bytes), &self.trusted(), &mut |_| {})
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// An archive with entries written verbatim: paths and types a normal builder refuses.
fn raw_archive(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, kind, data) in entries {
        let mut header = tar::Header::new_gnu();
        let name = &mut header.as_gnu_mut().unwrap().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// A signed package around a manifest and the given extra entries.
fn signed_raw(key: &SecretKey, manifest: &[u8], extra: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
    let sig = serde_json::to_vec(&key.sign(manifest)).unwrap();
    let mut entries =
        vec![(MANIFEST_PATH, tar::EntryType::Regular, manifest), (SIGNATURE_PATH, tar::EntryType::Regular, &sig[..])];
    entries.extend_from_slice(extra);
    raw_archive(&entries)
}

fn error_of(result: Result<Verified, PackageError>) -> String {
    result.expect_err("the package must be refused").to_string()
}

#[test]
fn every_kind_builds_and_verifies() {
    let fx = Fixture::new();
    for kind in PackageKind::ALL.into_iter().filter(|k| *k != PackageKind::Bundle) {
        let bytes = fx.package(kind);
        let mut announced = None;
        let verified =
            verify(&mut Cursor::new(&bytes), &fx.trusted(), &mut |m| announced = Some(m.tag.clone())).unwrap();
        assert_eq!(verified.manifest.kind, kind);
        assert_eq!(verified.size, bytes.len() as u64);
        assert_eq!(verified.key_id, fx.key.public().id());
        assert_eq!(announced.as_deref(), Some(verified.manifest.tag.as_str()));
        let expected_tag =
            if kind.is_patch() { "30.2.2-9100-2p1-20261122.101500" } else { "30.2.2-9100-20261122.101500" };
        assert_eq!(verified.manifest.tag, expected_tag);
    }
}

#[test]
fn payload_files_carry_their_hashes_modes_and_hooks() {
    let fx = Fixture::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let bin = fx.dir.path().join("controller/bin/fulcrum");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let verified = fx.verify(&fx.package(PackageKind::Controller)).unwrap();
    let m = &verified.manifest;
    let bin = m.file("controller/bin/fulcrum").unwrap();
    assert_eq!(bin.sha256, sha256_hex(b"#!controller"));
    assert_eq!(bin.size, 12);
    #[cfg(unix)]
    assert_eq!(bin.mode, 0o755);
    assert_eq!(m.controller.as_ref().unwrap().pre_install.as_deref(), Some("controller/hooks/pre-install"));
    assert_eq!(m.se_image.as_ref().unwrap().pre_install, None);
    assert!(m.file("se/bin/fulcrum-se").is_some());
}

#[test]
fn builds_are_reproducible() {
    let fx = Fixture::new();
    assert_eq!(fx.package(PackageKind::SePatch), fx.package(PackageKind::SePatch));
}

#[test]
fn a_bundle_verifies_its_components_and_locates_them() {
    let fx = Fixture::new();
    let base = fx.write("base.pkg", &fx.package(PackageKind::Controller));
    let cp = fx.write("cp.pkg", &fx.package(PackageKind::ControllerPatch));
    let sp = fx.write("sp.pkg", &fx.package(PackageKind::SePatch));
    let mut spec = fx.spec(PackageKind::Bundle);
    spec.components = vec![
        (ComponentRole::Base, base.clone()),
        (ComponentRole::ControllerPatch, cp),
        (ComponentRole::SePatch, sp.clone()),
    ];
    let mut bytes = Vec::new();
    build(&spec, Some(&fx.key), &mut bytes).unwrap();
    let verified = fx.verify(&bytes).unwrap();
    assert_eq!(verified.manifest.tag, "30.2.2-9100-20261122.101500");
    assert_eq!(verified.components.len(), 3);
    let se = verified.component(ComponentRole::SePatch).unwrap();
    let sp_bytes = std::fs::read(&sp).unwrap();
    let at = se.offset as usize;
    assert_eq!(&bytes[at..at + se.size as usize], &sp_bytes[..]);
    assert_eq!(se.package.sha256, sha256_hex(&sp_bytes));
    assert_eq!(verified.sha256, sha256_hex(&bytes));
    assert_eq!(se.package.manifest.kind, PackageKind::SePatch);
    // A bundle whose base is a patch is refused when built and when verified.
    let mut wrong = fx.spec(PackageKind::Bundle);
    wrong.components = vec![(ComponentRole::Base, fx.write("p.pkg", &fx.package(PackageKind::SePatch)))];
    let mut out = Vec::new();
    build(&wrong, Some(&fx.key), &mut out).unwrap();
    assert!(error_of(fx.verify(&out)).contains("base component is a se_patch"));
    let _ = Path::new(&base);
}

#[test]
fn a_component_signed_by_an_untrusted_key_spoils_the_bundle() {
    let fx = Fixture::new();
    let stranger = Fixture::new();
    let base = fx.write("base.pkg", &stranger.package(PackageKind::Controller));
    let mut spec = fx.spec(PackageKind::Bundle);
    spec.components = vec![(ComponentRole::Base, base)];
    let mut bytes = Vec::new();
    build(&spec, Some(&fx.key), &mut bytes).unwrap();
    assert!(error_of(fx.verify(&bytes)).contains("not trusted"));
}

#[test]
fn unsigned_and_wrongly_signed_packages_are_refused() {
    let fx = Fixture::new();
    let mut unsigned = Vec::new();
    build(&fx.spec(PackageKind::SePatch), None, &mut unsigned).unwrap();
    assert!(error_of(fx.verify(&unsigned)).contains("not signed"));
    // Signing it afterwards makes it good.
    let mut signed = Vec::new();
    sign(&mut Cursor::new(&unsigned), &fx.key, &mut signed).unwrap();
    fx.verify(&signed).unwrap();
    // Re-signing with another key replaces the signature.
    let other = SecretKey::generate();
    let mut resigned = Vec::new();
    sign(&mut Cursor::new(&signed), &other, &mut resigned).unwrap();
    assert!(error_of(fx.verify(&resigned)).contains("not trusted"));
    // A manifest edited after signing.
    let text = String::from_utf8_lossy(&signed).into_owned();
    let edited = text.replacen("\"min_version\": \"30.1.1\"", "\"min_version\": \"30.1.2\"", 1);
    assert_ne!(text, edited);
    assert!(error_of(fx.verify(edited.as_bytes())).contains("does not match"));
}

#[test]
fn tampered_payloads_are_refused() {
    let fx = Fixture::new();
    let bytes = fx.package(PackageKind::SePatch);
    let at = bytes.windows(4).position(|w| w == b"#!se").unwrap();
    let mut tampered = bytes.clone();
    tampered[at + 2] = b'X';
    assert!(error_of(fx.verify(&tampered)).contains("hash mismatch: the sha256 of 'se/bin/fulcrum-se'"));
}

#[test]
fn truncation_anywhere_is_detected() {
    let fx = Fixture::new();
    let bytes = fx.package(PackageKind::Controller);
    for cut in [0, 100, 512, 1500, bytes.len() / 2, bytes.len() - 1024, bytes.len() - 512, bytes.len() - 1] {
        let err = error_of(fx.verify(&bytes[..cut]));
        assert!(
            err.contains("truncated") || err.contains("not a Fulcrum package") || err.contains("ends"),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn garbage_is_not_a_package() {
    let fx = Fixture::new();
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    assert!(error_of(fx.verify(&noise)).contains("not a Fulcrum package"));
    assert!(error_of(fx.verify(b"")).contains("not a Fulcrum package"));
    let plain_tar = raw_archive(&[("README", tar::EntryType::Regular, b"hello")]);
    assert!(error_of(fx.verify(&plain_tar)).contains("first entry must be manifest.json"));
    let mut trailing = fx.package(PackageKind::SePatch);
    trailing.extend_from_slice(b"extra");
    assert!(error_of(fx.verify(&trailing)).contains("follow the end"));
}

fn manifest_with_file(fx: &Fixture, path: &str, data: &[u8]) -> Vec<u8> {
    let mut spec_bytes = Vec::new();
    build(&fx.spec(PackageKind::SePatch), None, &mut spec_bytes).unwrap();
    let mut manifest = read_head(&mut Cursor::new(&spec_bytes)).unwrap().manifest;
    manifest.files.push(FileEntry {
        path: path.into(),
        sha256: sha256_hex(data),
        size: data.len() as u64,
        mode: 0o644,
    });
    serde_json::to_vec(&manifest).unwrap()
}

#[test]
fn entries_that_escape_or_link_are_refused() {
    let fx = Fixture::new();
    let cases: [(&str, tar::EntryType, &str); 4] = [
        ("se/../../etc/cron.d/x", tar::EntryType::Regular, "contains '..'"),
        ("/etc/passwd", tar::EntryType::Regular, "is absolute"),
        ("se/link", tar::EntryType::Symlink, "is a link"),
        ("se/hard", tar::EntryType::Link, "is a link"),
    ];
    for (path, kind, expected) in cases {
        // Signed by a trusted key: the archive itself must still be refused.
        let manifest = manifest_with_file(&fx, "se/lib/extra", b"1");
        let bytes = signed_raw(
            &fx.key,
            &manifest,
            &[
                ("se/bin/fulcrum-se", tar::EntryType::Regular, b"#!se"),
                ("se/lib/extra", tar::EntryType::Regular, b"1"),
                (path, kind, b""),
            ],
        );
        let err = error_of(fx.verify(&bytes));
        assert!(err.contains("unsafe archive entry") && err.contains(expected), "{path}: {err}");
    }
}

#[test]
fn unlisted_entries_and_unknown_kinds_are_refused() {
    let fx = Fixture::new();
    let manifest = manifest_with_file(&fx, "se/extra", b"1");
    let bytes = signed_raw(
        &fx.key,
        &manifest,
        &[("se/bin/fulcrum-se", tar::EntryType::Regular, b"#!se"), ("se/other", tar::EntryType::Regular, b"1")],
    );
    assert!(error_of(fx.verify(&bytes)).contains("not in the manifest"));
    let text = String::from_utf8(manifest).unwrap().replace("\"se_patch\"", "\"firmware\"");
    let bytes = signed_raw(&fx.key, text.as_bytes(), &[]);
    let err = error_of(fx.verify(&bytes));
    assert!(err.contains("invalid manifest") && err.contains("firmware"), "{err}");
}

#[test]
fn hex_round_trips() {
    assert_eq!(hex(&[0, 15, 255]), "000fff");
    assert_eq!(unhex("000fff").unwrap(), vec![0, 15, 255]);
    assert!(unhex("0g").is_none());
    assert!(unhex("abc").is_none());
}

#[test]
fn unpack_writes_one_payload_and_catches_a_change_after_verification() {
    let f = Fixture::new();
    std::fs::create_dir_all(f.dir.path().join("se/hooks")).unwrap();
    std::fs::write(f.dir.path().join("se/hooks/health-check"), b"#!/bin/sh\nexit 0\n").unwrap();
    let bytes = f.package(PackageKind::Controller);
    let verified = f.verify(&bytes).unwrap();
    let se = verified.manifest.se_image.clone().unwrap();
    assert_eq!(se.health_check.as_deref(), Some("se/hooks/health-check"));
    let dest = tempfile::tempdir().unwrap();
    let n = unpack(&mut Cursor::new(&bytes), &verified.manifest, SE_ROOT, dest.path()).unwrap();
    assert_eq!(n, 2, "the SE payload only");
    assert_eq!(std::fs::read(dest.path().join("bin/fulcrum-se")).unwrap(), b"#!se");
    assert!(!dest.path().join("etc/config").exists(), "controller files stay out");
    // A payload byte flipped after verification: the unpacked file does not match its hash.
    let at = bytes.windows(4).position(|w| w == b"#!se").unwrap();
    let mut changed = bytes.clone();
    changed[at + 2] = b'X';
    let again = tempfile::tempdir().unwrap();
    let err = unpack(&mut Cursor::new(&changed), &verified.manifest, SE_ROOT, again.path()).unwrap_err();
    assert!(matches!(err, PackageError::HashMismatch(_)), "{err}");
}

#[test]
fn hooks_are_packaged_executable() {
    let f = Fixture::new();
    let bytes = f.package(PackageKind::Controller);
    let m = f.verify(&bytes).unwrap().manifest;
    let hook = m.file("controller/hooks/pre-install").unwrap();
    assert_eq!(hook.mode & 0o111, 0o111, "mode {:o}", hook.mode);
    let plain = m.file("controller/etc/config").unwrap();
    assert_eq!(plain.mode & 0o111, 0, "other files keep their mode");
}
