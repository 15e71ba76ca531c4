//! `fulcrum pkg`: make and check packages (keygen, build, sign, inspect, verify).

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use fulcrum_package::{BuildSpec, ComponentRole, PackageKind, PublicKey, Requirements, SecretKey, TrustedKeys};

#[derive(Subcommand)]
pub enum PkgCommand {
    /// Make a signing key pair: <OUT>.secret and <OUT>.pub.
    Keygen {
        /// Path prefix of the two files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Build a package from directories of files, or a bundle from packages.
    Build(Box<BuildArgs>),
    /// Sign a package (replacing any signature it has).
    Sign {
        #[arg(long)]
        key: PathBuf,
        package: PathBuf,
        /// Where to write the signed package (in place by default).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Print a package's manifest and who signed it, without checking anything.
    Inspect { package: PathBuf },
    /// Check a package completely: signature, manifest, every file's hash.
    Verify {
        /// A trusted public key (repeatable).
        #[arg(long = "trusted-key", required = true)]
        trusted_keys: Vec<PathBuf>,
        package: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct BuildArgs {
    /// controller, controller_docker, avi_patch, controller_patch, se_patch or bundle.
    #[arg(long, value_parser = parse_kind)]
    pub kind: PackageKind,
    /// Version such as 30.2.2 (a bundle takes its base's).
    #[arg(long, default_value = "")]
    pub version: String,
    /// Build number (a bundle takes its base's).
    #[arg(long, default_value_t = 0)]
    pub build: u64,
    /// Build date as YYYYMMDD.HHMMSS; now (UTC) by default.
    #[arg(long)]
    pub date: Option<String>,
    /// Patch version such as 2p1 (patches only).
    #[arg(long)]
    pub patch: Option<String>,
    /// The oldest version the package upgrades from (the package's own version by default).
    #[arg(long)]
    pub min_version: Option<String>,
    #[arg(long, default_value = "fulcrum")]
    pub product: String,
    /// Files the controller installs.
    #[arg(long)]
    pub controller_dir: Option<PathBuf>,
    /// The SE image: files the SE agent installs.
    #[arg(long)]
    pub se_dir: Option<PathBuf>,
    /// Bundle parts.
    #[arg(long)]
    pub base: Option<PathBuf>,
    #[arg(long)]
    pub controller_patch: Option<PathBuf>,
    #[arg(long)]
    pub se_patch: Option<PathBuf>,
    /// Free disk the controller needs to install it, in bytes.
    #[arg(long, default_value_t = 0)]
    pub controller_disk: u64,
    /// Free disk each SE needs, in bytes.
    #[arg(long, default_value_t = 0)]
    pub se_disk: u64,
    /// Oldest Docker version (Docker-based controllers).
    #[arg(long)]
    pub docker_version: Option<String>,
    /// Supported cloud type (repeatable), e.g. CLOUD_VCENTER; none means all.
    #[arg(long = "cloud")]
    pub clouds: Vec<String>,
    /// Sign with this secret key (else sign later with `pkg sign`).
    #[arg(long)]
    pub key: Option<PathBuf>,
    #[arg(short, long)]
    pub output: PathBuf,
}

fn parse_kind(s: &str) -> Result<PackageKind, String> {
    PackageKind::parse(s).ok_or_else(|| {
        let all: Vec<_> = PackageKind::ALL.iter().map(|k| k.as_str()).collect();
        format!("unknown kind '{s}' (one of {})", all.join(", "))
    })
}

fn read_text(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn read_public_key(path: &Path) -> Result<PublicKey, String> {
    PublicKey::parse(&read_text(path)?).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_secret_key(path: &Path) -> Result<SecretKey, String> {
    SecretKey::parse(&read_text(path)?).map_err(|e| format!("{}: {e}", path.display()))
}

fn create(path: &Path) -> Result<BufWriter<File>, String> {
    File::create(path).map(|f| BufWriter::with_capacity(1 << 20, f)).map_err(|e| format!("{}: {e}", path.display()))
}

fn open(path: &Path) -> Result<BufReader<File>, String> {
    File::open(path).map(|f| BufReader::with_capacity(1 << 20, f)).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes through a temporary file and renames, so a failed build leaves no half package.
fn write_atomically(path: &Path, produce: impl FnOnce(&mut dyn Write) -> Result<(), String>) -> Result<(), String> {
    let tmp = path.with_extension("partial");
    let result = (|| {
        let mut out = create(&tmp)?;
        produce(&mut out)?;
        let file = out.into_inner().map_err(|e| e.to_string())?;
        file.sync_all().map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub fn run(command: PkgCommand) -> Result<(), String> {
    match command {
        PkgCommand::Keygen { out } => {
            let key = SecretKey::generate();
            let secret = PathBuf::from(format!("{}.secret", out.display()));
            let public = PathBuf::from(format!("{}.pub", out.display()));
            write_private(&secret, key.to_text().as_bytes())?;
            let comment = out.file_name().and_then(|n| n.to_str()).unwrap_or("fulcrum");
            std::fs::write(&public, key.public().to_text(comment)).map_err(|e| format!("{}: {e}", public.display()))?;
            println!("key {} written to {} and {}", key.public().id(), secret.display(), public.display());
            Ok(())
        }
        PkgCommand::Build(args) => {
            let BuildArgs {
                kind,
                version,
                build,
                date,
                patch,
                min_version,
                product,
                controller_dir,
                se_dir,
                base,
                controller_patch,
                se_patch,
                controller_disk,
                se_disk,
                docker_version,
                clouds,
                key,
                output,
            } = *args;
            let key = key.as_deref().map(read_secret_key).transpose()?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
            let components: Vec<_> = [
                (ComponentRole::Base, base),
                (ComponentRole::ControllerPatch, controller_patch),
                (ComponentRole::SePatch, se_patch),
            ]
            .into_iter()
            .filter_map(|(role, path)| Some((role, path?)))
            .collect();
            let spec = BuildSpec {
                product,
                kind,
                min_version: min_version.unwrap_or_else(|| version.clone()),
                version,
                build,
                build_date: date.unwrap_or_else(|| fulcrum_package::build_date(now)),
                patch_version: patch,
                requirements: Requirements {
                    controller_free_disk_bytes: controller_disk,
                    se_free_disk_bytes: se_disk,
                    docker_version,
                    cloud_types: clouds,
                },
                controller_dir,
                se_dir,
                components,
            };
            let mut tag = String::new();
            write_atomically(&output, |out| {
                let manifest = fulcrum_package::build(&spec, key.as_ref(), out).map_err(|e| e.to_string())?;
                tag = manifest.tag;
                Ok(())
            })?;
            let signed = if key.is_some() { "signed" } else { "unsigned" };
            println!("built {} ({}, {signed}) at {}", tag, kind.as_str(), output.display());
            Ok(())
        }
        PkgCommand::Sign { key, package, output } => {
            let key = read_secret_key(&key)?;
            let target = output.unwrap_or_else(|| package.clone());
            let mut input = open(&package)?;
            write_atomically(&target, |out| fulcrum_package::sign(&mut input, &key, out).map_err(|e| e.to_string()))?;
            println!("signed {} with key {}", target.display(), key.public().id());
            Ok(())
        }
        PkgCommand::Inspect { package } => {
            let head = fulcrum_package::read_head(&mut open(&package)?).map_err(|e| e.to_string())?;
            let (manifest, signature) = (head.manifest, head.signature);
            println!("{}", serde_json::to_string_pretty(&manifest).expect("a manifest serializes"));
            match signature.and_then(|s| serde_json::from_slice::<fulcrum_package::SignatureFile>(&s).ok()) {
                Some(sig) => println!("signed by key {}", sig.key_id),
                None => println!("not signed"),
            }
            Ok(())
        }
        PkgCommand::Verify { trusted_keys, package } => {
            let keys = TrustedKeys::new(trusted_keys.iter().map(|p| read_public_key(p)).collect::<Result<_, _>>()?);
            let verified = fulcrum_package::verify(&mut open(&package)?, &keys, &mut |_| {})
                .map_err(|e| format!("{}: {e}", package.display()))?;
            let m = &verified.manifest;
            println!(
                "{}: OK: {} {} ({} files, {} bytes), signed by key {}, sha256 {}",
                package.display(),
                m.kind.as_str(),
                m.tag,
                m.files.len(),
                verified.size,
                verified.key_id,
                verified.sha256
            );
            for c in &verified.components {
                println!("  {}: {} {}", c.role.as_str(), c.package.manifest.kind.as_str(), c.package.manifest.tag);
            }
            Ok(())
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(bytes).map_err(|e| format!("{}: {e}", path.display()))
}
