//! The image service through the real binary: packages made with `fulcrum pkg`, uploaded with
//! curl and over HTTP, queried, deleted; every bad input; crashes mid-upload; resumable uploads.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::packages::{Packages, fulcrum, multipart, sha256_file, upload, upload_bytes};
use common::{Api, Controller, Launch, PASSWORD, Resp, shell, shell_command, start, temp_dir, try_start};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn images(api: &Api) -> Vec<Value> {
    api.object("/api/image?page_size=200")["results"].as_array().unwrap().clone()
}

/// Nothing of a refused upload remains: no record, no temporary file, no package file.
fn assert_nothing_left(c: &Controller, api: &Api, records: usize, files: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tmp = std::fs::read_dir(c.data_dir.join("images/tmp")).unwrap().count();
        let pkgs = std::fs::read_dir(c.data_dir.join("images"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "pkg"))
            .count();
        let listed = images(api).len();
        if (tmp, pkgs, listed) == (0, files, records) {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: {tmp} temp files, {pkgs} packages, {listed} records");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_documented_curl_command_uploads_a_controller_package() {
    let pkgs = Packages::new();
    let package = pkgs.build("controller.pkg", "controller", "30.2.2", "9100", &["--controller-disk", "1073741824"]);
    let data = pkgs.data_dir();
    let c = try_start(Launch { plain_http: false, ..Launch::plain(data.path()) }).expect("starts");
    let out = Command::new("curl")
        .current_dir(pkgs.dir.path())
        .args(["-sS", "-X", "POST", "-k", "-u", &format!("admin:{PASSWORD}"), "-F", "file=@controller.pkg"])
        .arg(format!("{}/api/image", c.url))
        .args(["-w", "\n%{http_code}"])
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap();
    assert_eq!(code, "201", "{body}");
    let created: Value = serde_json::from_str(body).unwrap();
    let api = c.admin();
    let image = api.object(&format!("/api/image/{}", created["uuid"].as_str().unwrap()));
    let hash = sha256_file(&package);
    assert_eq!(image["name"], "30.2.2-9100-20261122.101500");
    assert_eq!(image["type"], "IMAGE_TYPE_SYSTEM");
    assert_eq!(image["uber_bundle"], false);
    assert_eq!(image["img_state"]["state"], "IMAGE_FSM_COMPLETED");
    assert_eq!(image["progress"], 100);
    assert_eq!(image["size"], std::fs::metadata(&package).unwrap().len());
    for info in ["controller_info", "se_info"] {
        let build = &image[info]["build"];
        assert_eq!(build["version"], "30.2.2", "{info}");
        assert_eq!(build["build_no"], 9100);
        assert_eq!(build["date"], "20261122.101500");
        assert_eq!(build["tag"], "30.2.2-9100-20261122.101500");
        assert_eq!(build["min_version"], "30.1.1");
        assert_eq!(build["product"], "fulcrum");
        assert_eq!(image[info]["hash"], hash.as_str());
        let stored = PathBuf::from(image[info]["path"].as_str().unwrap());
        assert_eq!(sha256_file(&stored), hash, "the stored file is the uploaded package");
    }
    assert_eq!(image["migrations"]["controller_host_min_free_disk_size"], 1);
    assert!(image["start_time"].as_str().unwrap().starts_with("20"));
    assert!(image["end_time"].as_str().is_some());
    assert!(image["duration"].as_u64().is_some());
    assert_eq!(image["url"].as_str().unwrap(), format!("{}/api/image/{}", c.url, image["uuid"].as_str().unwrap()));
    // Query by name.
    let found = api.object("/api/image?name=30.2.2-9100-20261122.101500");
    assert_eq!(found["count"], 1);
    let metrics = c.anonymous().get("/metrics").body;
    assert!(metrics.contains("fulcrum_image_uploads_total{outcome=\"success\"} 1"), "{metrics}");
    assert!(metrics.contains("fulcrum_image_upload_bytes_total{how=\"multipart\"}"), "{metrics}");
}

#[test]
fn every_kind_and_a_composite_are_described_field_by_field() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let c = start(data.path());
    let api = c.admin();
    // (file, kind, version, type, has controller_info, has se_info, patch)
    let cases = [
        ("docker.tgz", "controller_docker", "30.2.3", "IMAGE_TYPE_SYSTEM", true, false, None),
        ("avi_patch.pkg", "avi_patch", "30.2.2", "IMAGE_TYPE_PATCH", true, true, Some("2p1")),
        ("controller_patch.pkg", "controller_patch", "30.2.4", "IMAGE_TYPE_PATCH", true, false, Some("2p1")),
        ("se_patch.pkg", "se_patch", "30.2.5", "IMAGE_TYPE_PATCH", false, true, Some("2p1")),
    ];
    for (file, kind, version, image_type, controller, se, patch) in cases {
        let path = pkgs.build(file, kind, version, "9100", &[]);
        let r = upload(&api, &path);
        assert_eq!(r.status, 201, "{kind}: {}", r.body);
        let image = r.json();
        let tag = match patch {
            Some(p) => format!("{version}-9100-{p}-20261122.101500"),
            None => format!("{version}-9100-20261122.101500"),
        };
        assert_eq!(image["name"], tag.as_str(), "{kind}");
        assert_eq!(image["type"], image_type, "{kind}");
        assert_eq!(image.get("controller_info").is_some(), controller, "{kind}");
        assert_eq!(image.get("se_info").is_some(), se, "{kind}");
        let info = if controller { &image["controller_info"] } else { &image["se_info"] };
        assert_eq!(info["hash"], sha256_file(&path).as_str(), "{kind}");
        assert_eq!(info["build"]["patch_version"].as_str(), patch, "{kind}");
        if patch.is_some() {
            assert_eq!(info["patch"]["patch_type"], kind);
        }
        if kind == "controller_docker" {
            assert_eq!(image["migrations"]["controller_min_docker_version"], "20.10");
        }
    }

    // A composite: base + controller patch + SE patch of 30.3.1.
    let base = pkgs.build("base.pkg", "controller", "30.3.1", "9300", &["--cloud", "CLOUD_VCENTER"]);
    let cp = pkgs.build("cp.pkg", "controller_patch", "30.3.1", "9310", &[]);
    let sp = pkgs.build("sp.pkg", "se_patch", "30.3.1", "9320", &[]);
    let bundle = pkgs.bundle("bundle.pkg", &base, Some(&cp), Some(&sp));
    let verified = fulcrum(&[
        "pkg",
        "verify",
        "--trusted-key",
        pkgs.path("release.pub").to_str().unwrap(),
        bundle.to_str().unwrap(),
    ]);
    assert!(verified.contains("controller_patch: controller_patch 30.3.1-9310-2p1-20261122.101500"), "{verified}");
    assert!(verified.contains(&format!("sha256 {}", sha256_file(&bundle))), "{verified}");
    let r = upload(&api, &bundle);
    assert_eq!(r.status, 201, "{}", r.body);
    let top = r.json();
    assert_eq!(top["name"], "30.3.1-9300-20261122.101500");
    assert_eq!(top["type"], "IMAGE_TYPE_SYSTEM");
    assert_eq!(top["uber_bundle"], true);
    assert_eq!(top["controller_info"]["build"]["version"], "30.3.1");
    assert_eq!(top["cloud_info_values"][0]["cloud_name"], "CLOUD_VCENTER");
    assert_eq!(top["controller_patch_name"], "30.3.1-9310-2p1-20261122.101500");
    assert_eq!(top["se_patch_name"], "30.3.1-9320-2p1-20261122.101500");
    for (field, part_file, kind) in
        [("controller_patch_ref", &cp, "controller_patch"), ("se_patch_ref", &sp, "se_patch")]
    {
        let url = top[field].as_str().unwrap();
        let path = url.strip_prefix(&c.url).unwrap().split('#').next().unwrap();
        let part = api.object(path);
        assert_eq!(part["type"], "IMAGE_TYPE_PATCH");
        assert_eq!(part["img_state"]["state"], "IMAGE_FSM_COMPLETED");
        let info = if kind == "se_patch" { &part["se_info"] } else { &part["controller_info"] };
        assert_eq!(info["hash"], sha256_file(part_file).as_str(), "{kind}: the part's hash is its own package's");
        assert_eq!(part["size"], std::fs::metadata(part_file).unwrap().len());
    }
    assert_eq!(images(&api).len(), 4 + 3);
}

#[test]
fn bad_packages_are_refused_and_leave_nothing_behind() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let c = start(data.path());
    let api = c.admin();
    let good = std::fs::read(pkgs.build("good.pkg", "se_patch", "30.2.2", "9100", &[])).unwrap();

    let mut tampered = good.clone();
    let at = tampered.windows(9).position(|w| w == b"echo se\n\0" || w.starts_with(b"echo se")).unwrap();
    tampered[at] = b'E';
    let unsigned = {
        let out = pkgs.path("unsigned.pkg");
        let se = pkgs.path("se");
        fulcrum(&[
            "pkg",
            "build",
            "--kind",
            "se_patch",
            "--version",
            "30.2.2",
            "--build",
            "9100",
            "--patch",
            "2p1",
            "--se-dir",
            se.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        std::fs::read(out).unwrap()
    };
    let stranger = {
        let other = temp_dir();
        fulcrum(&["pkg", "keygen", "--out", other.path().join("k").to_str().unwrap()]);
        let out = pkgs.path("stranger.pkg");
        fulcrum(&[
            "pkg",
            "sign",
            "--key",
            other.path().join("k.secret").to_str().unwrap(),
            pkgs.path("good.pkg").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        std::fs::read(out).unwrap()
    };
    let unknown_kind = {
        // Same length, so the manifest entry keeps its size; then signed by the trusted key.
        let text = unsigned.clone();
        let at = text.windows(10).position(|w| w == b"\"se_patch\"").unwrap();
        let mut edited = text;
        edited[at..at + 10].copy_from_slice(b"\"firmware\"");
        let path = pkgs.path("unknown.pkg");
        std::fs::write(&path, edited).unwrap();
        fulcrum(&["pkg", "sign", "--key", &pkgs.key(), path.to_str().unwrap()]);
        std::fs::read(path).unwrap()
    };
    let noise: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not a package", noise, "not a Fulcrum package"),
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        ("hash mismatch", tampered, "hash mismatch"),
        ("untrusted signature", stranger, "not trusted"),
        ("missing signature", unsigned, "not signed"),
        ("unknown kind", unknown_kind, "firmware"),
        ("escaping entry", crafted(&pkgs, "se/../../../etc/cron.d/evil", tar::EntryType::Regular), "contains '..'"),
        ("absolute entry", crafted(&pkgs, "/etc/cron.d/evil", tar::EntryType::Regular), "is absolute"),
        ("symbolic link", crafted(&pkgs, "se/link", tar::EntryType::Symlink), "is a link"),
        ("hard link", crafted(&pkgs, "se/hard", tar::EntryType::Link), "is a link"),
    ];
    for (what, bytes, expected) in cases {
        let r = upload_bytes(&api, &bytes);
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        assert!(r.error().contains(expected), "{what}: {}", r.error());
        assert_nothing_left(&c, &api, 0, 0);
    }
    // Not multipart, or no field 'file'.
    let r =
        api.clone().header("Content-Type", "application/json").send("POST", "/api/image", Some(b"{\"name\": \"x\"}"));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().contains("multipart/form-data"), "{}", r.error());
    let (content_type, body) = multipart("other", "x.pkg", &good);
    let r = api.clone().header("Content-Type", &content_type).send("POST", "/api/image", Some(&body));
    assert_eq!(r.status, 400);
    assert!(r.error().contains("no field 'file'"), "{}", r.error());
    assert_nothing_left(&c, &api, 0, 0);

    // The same tag twice → 409, and the first stays intact.
    assert_eq!(upload_bytes(&api, &good).status, 201);
    let r = upload_bytes(&api, &good);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("already exists"), "{}", r.error());
    assert_nothing_left(&c, &api, 1, 1);
    // Editing an image by hand is refused.
    let uuid = images(&api)[0]["uuid"].as_str().unwrap().to_string();
    assert_eq!(api.put(&format!("/api/image/{uuid}"), &json!({"name": "x"})).status, 405);
}

/// A package signed by the trusted key whose archive holds one bad entry besides a good file.
fn crafted(pkgs: &Packages, bad_path: &str, kind: tar::EntryType) -> Vec<u8> {
    let good = b"#!/bin/sh\n";
    let hash = fulcrum_package::hex(&Sha256::digest(good));
    let manifest = json!({
        "format": 1, "product": "fulcrum", "kind": "se_patch", "version": "30.2.9", "build": 1,
        "build_date": "20261122.101500", "tag": "30.2.9-1-2p1-20261122.101500", "patch_version": "2p1",
        "min_version": "30.1.1", "se_image": {"root": "se/"},
        "files": [{"path": "se/bin/x", "sha256": hash, "size": good.len()}],
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    for (path, entry_type, data) in [
        ("manifest.json", tar::EntryType::Regular, &manifest[..]),
        ("se/bin/x", tar::EntryType::Regular, good),
        (bad_path, kind, b""),
    ] {
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_entry_type(entry_type);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    let path = pkgs.path("crafted.pkg");
    std::fs::write(&path, builder.into_inner().unwrap()).unwrap();
    fulcrum(&["pkg", "sign", "--key", &pkgs.key(), path.to_str().unwrap()]);
    std::fs::read(path).unwrap()
}

/// Sends the headers and the first part of a multipart upload over a raw connection.
fn raw_upload_start(c: &Controller, total_len: usize, first: &[u8]) -> TcpStream {
    let addr = c.url.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(addr).unwrap();
    let auth = base64_basic();
    write!(
        stream,
        "POST /api/image HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: {total_len}\r\n\r\n"
    )
    .unwrap();
    stream.write_all(first).unwrap();
    stream
}

fn base64_basic() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("admin:{PASSWORD}"))
}

fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A package big enough that an upload of it takes a while to send.
fn big_package(pkgs: &Packages, name: &str, version: &str, mib: usize) -> PathBuf {
    let se = pkgs.path(&format!("se-{name}"));
    std::fs::create_dir_all(se.join("lib")).unwrap();
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
    let mut f = std::fs::File::create(se.join("lib/blob")).unwrap();
    for _ in 0..mib {
        f.write_all(&block).unwrap();
    }
    let out = pkgs.path(name);
    fulcrum(&[
        "pkg",
        "build",
        "--kind",
        "se_patch",
        "--version",
        version,
        "--build",
        "1",
        "--patch",
        "1p1",
        "--se-dir",
        se.to_str().unwrap(),
        "--key",
        &pkgs.key(),
        "-o",
        out.to_str().unwrap(),
    ]);
    out
}

#[test]
fn kill_9_during_an_upload_leaves_nothing_after_restart() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let package = std::fs::read(big_package(&pkgs, "big.pkg", "30.2.7", 24)).unwrap();
    let c = start(data.path());
    let api = c.admin();
    let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.pkg\"\r\n\r\n".to_vec();
    let head = body.len();
    body.extend_from_slice(&package);
    body.extend_from_slice(b"\r\n--XyZ--\r\n");
    let mut stream = raw_upload_start(&c, body.len(), &body[..head + package.len() * 2 / 5]);
    // While it runs the image shows its state; a later frame updates its progress.
    let record = wait_for("the in-progress record", || images(&api).into_iter().next());
    assert_eq!(record["img_state"]["state"], "IMAGE_FSM_IN_PROGRESS");
    assert!(record["name"].as_str().unwrap().starts_with("30.2.7-1-1p1-"), "{record}");
    std::thread::sleep(Duration::from_millis(600));
    stream.write_all(&body[head + package.len() * 2 / 5..head + package.len() / 2]).unwrap();
    let progressed = wait_for("progress", || {
        let r = images(&api).into_iter().next()?;
        (r["progress"].as_u64()? >= 30).then_some(r)
    });
    assert!(progressed["progress"].as_u64().unwrap() < 100);
    let tmp_dir = c.data_dir.join("images/tmp");
    assert_eq!(std::fs::read_dir(&tmp_dir).unwrap().count(), 1);
    c.kill9();
    drop(stream);
    let c = start(data.path());
    let api = c.admin();
    assert!(images(&api).is_empty(), "an interrupted upload must not be listed");
    assert_nothing_left(&c, &api, 0, 0);
    // And the same package uploads fine afterwards.
    assert_eq!(upload_bytes(&api, &package).status, 201);
}

#[test]
fn two_uploads_at_once_both_land_and_one_tag_cannot_land_twice() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let a = big_package(&pkgs, "a.pkg", "30.2.7", 8);
    let b = big_package(&pkgs, "b.pkg", "30.2.8", 8);
    let c = start(data.path());
    let api = c.admin();
    let results: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = [&a, &b]
            .map(|p| {
                let api = api.clone();
                s.spawn(move || upload(&api, p).status)
            })
            .into_iter()
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results, vec![201, 201]);
    assert_eq!(images(&api).len(), 2);
    let twice: Vec<u16> = std::thread::scope(|s| {
        let c2 = big_package(&pkgs, "c.pkg", "30.2.9", 8);
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let api = api.clone();
                let c2 = c2.clone();
                s.spawn(move || upload(&api, &c2).status)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut sorted = twice.clone();
    sorted.sort();
    assert_eq!(sorted, vec![201, 409], "{twice:?}");
    assert_nothing_left(&c, &api, 3, 3);
}

#[test]
fn a_composite_whose_patches_share_a_patch_level_is_one_patch_image_with_two_sides() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let c = start(data.path());
    let api = c.admin();
    // The product names a release's patches by their level: 2p1 of 30.3.2-9400 is one tag for both.
    let base = pkgs.build("base.pkg", "controller", "30.3.2", "9400", &[]);
    let cp = pkgs.build("cp.pkg", "controller_patch", "30.3.2", "9400", &[]);
    let sp = pkgs.build("sp.pkg", "se_patch", "30.3.2", "9400", &[]);
    let bundle = pkgs.bundle("bundle.pkg", &base, Some(&cp), Some(&sp));
    let r = upload(&api, &bundle);
    assert_eq!(r.status, 201, "{}", r.body);
    let top = r.json();
    let tag = "30.3.2-9400-2p1-20261122.101500";
    assert_eq!(top["controller_patch_name"], tag);
    assert_eq!(top["se_patch_name"], tag);
    let uuid_of =
        |field: &str| top[field].as_str().unwrap().rsplit('/').next().unwrap().split('#').next().unwrap().to_string();
    assert_eq!(uuid_of("controller_patch_ref"), uuid_of("se_patch_ref"), "both sides are one patch image");
    let patch = api.object(&format!("/api/image?name={tag}"))["results"][0].clone();
    assert_eq!(patch["type"], "IMAGE_TYPE_PATCH");
    assert_eq!(
        patch["controller_info"]["hash"],
        sha256_file(&cp).as_str(),
        "the controller side is the controller patch"
    );
    assert_eq!(patch["se_info"]["hash"], sha256_file(&sp).as_str(), "the SE side is the SE patch");
    assert_eq!(images(&api).len(), 2);

    // An SE downloading the patch image gets the SE patch's bytes, exactly.
    let (_, token) = common::agents::token(&api, "Default-Group");
    let work = temp_dir();
    let agent = common::agents::Agent::start(&c, Some(&token), &work.path().join("se1"), "se1", &[]);
    common::agents::wait_for("the agent joined", Duration::from_secs(30), || {
        work.path().join("se1/identity.json").exists().then_some(())
    });
    let download = ureq::get(&format!("{}/api/se-agent/image/{}", c.url, uuid_of("se_patch_ref")))
        .set("Authorization", &format!("Bearer {}", agent.credential()))
        .call()
        .expect("the SE downloads its image");
    let mut bytes = Vec::new();
    download.into_reader().read_to_end(&mut bytes).unwrap();
    assert_eq!(format!("{:x}", Sha256::digest(&bytes)), sha256_file(&sp));
    drop(agent);

    // Deleting the composite takes the shared part once, and the file.
    assert_eq!(api.delete(&format!("/api/image/{}", top["uuid"].as_str().unwrap())).status, 204);
    assert_nothing_left(&c, &api, 0, 0);
}

#[test]
fn separate_patches_of_one_patch_level_are_refused_with_the_way_to_upload_them() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let c = start(data.path());
    let api = c.admin();
    let cp = pkgs.build("cp.pkg", "controller_patch", "30.3.2", "9400", &[]);
    let sp = pkgs.build("sp.pkg", "se_patch", "30.3.2", "9400", &[]);
    assert_eq!(upload(&api, &cp).status, 201);
    let r = upload(&api, &sp);
    assert_eq!(r.status, 409, "{}", r.body);
    for says in ["controller patch of this patch level", "bundle"] {
        assert!(r.error().contains(says), "{}", r.error());
    }
    assert_eq!(images(&api).len(), 1, "the refused upload left nothing");
}

#[test]
fn images_in_use_cannot_be_deleted() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let c = start(data.path());
    let api = c.admin();
    // The controller runs 30.2.1 build 9001: the image of that version is in use.
    let running = pkgs.build("running.pkg", "controller", "30.2.1", "9001", &[]);
    let running = upload(&api, &running).json();
    let r = api.delete(&format!("/api/image/{}", running["uuid"].as_str().unwrap()));
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("in use by the controller"), "{}", r.error());

    let base = pkgs.build("base.pkg", "controller", "30.3.1", "9300", &[]);
    let sp = pkgs.build("sp.pkg", "se_patch", "30.3.1", "9320", &[]);
    let bundle = pkgs.bundle("bundle.pkg", &base, None, Some(&sp));
    let top = upload(&api, &bundle).json();
    let part = top["se_patch_ref"].as_str().unwrap().rsplit('/').next().unwrap().split('#').next().unwrap().to_string();
    let r = api.delete(&format!("/api/image/{part}"));
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("part of the composite image '30.3.1-9300-20261122.101500'"), "{}", r.error());
    assert_nothing_left(&c, &api, 3, 2);

    // The composite goes with its parts and its file.
    let r = api.delete(&format!("/api/image/{}", top["uuid"].as_str().unwrap()));
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(api.get(&format!("/api/image/{part}")).status, 404);
    assert_nothing_left(&c, &api, 1, 1);
    let other = upload(&api, &pkgs.build("other.pkg", "se_patch", "30.2.5", "9100", &[])).json();
    let file = PathBuf::from(other["se_info"]["path"].as_str().unwrap());
    assert!(file.exists());
    assert_eq!(api.delete(&format!("/api/image/{}", other["uuid"].as_str().unwrap())).status, 204);
    assert!(!file.exists());
    assert_eq!(api.delete(&format!("/api/image/{}", other["uuid"].as_str().unwrap())).status, 404);
}

#[test]
fn not_enough_disk_is_507_before_anything_is_written() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let c = start(data.path());
    let api = c.admin();
    let mut stream = raw_upload_start(&c, 1 << 60, b"--XyZ\r\n");
    let mut answer = String::new();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 507"), "{answer}");
    assert!(answer.contains("not enough free disk"), "{answer}");
    let r = api.post("/api/image-upload", &json!({"size": 1u64 << 60}));
    assert_eq!(r.status, 507, "{}", r.body);
    assert_nothing_left(&c, &api, 0, 0);
}

fn put_chunk(api: &Api, id: &str, first: usize, data: &[u8], total: usize) -> Resp {
    let range = format!("bytes {first}-{}/{total}", first + data.len() - 1);
    api.clone().header("Content-Type", "application/octet-stream").header("Content-Range", &range).send(
        "PUT",
        &format!("/api/image-upload/{id}"),
        Some(data),
    )
}

#[test]
fn a_resumable_upload_survives_a_dropped_connection_and_a_restart() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let path = big_package(&pkgs, "r.pkg", "30.2.6", 3);
    let package = std::fs::read(&path).unwrap();
    let total = package.len();
    let c = start(data.path());
    let api = c.admin();
    let session = api.post("/api/image-upload", &json!({"size": total, "filename": "r.pkg"}));
    assert_eq!(session.status, 201, "{}", session.body);
    let id = session.json()["uuid"].as_str().unwrap().to_string();
    let chunk = 1 << 20;
    let r = put_chunk(&api, &id, 0, &package[..chunk], total);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["offset"], chunk);
    // The manifest has arrived: the image shows as in progress.
    let shown = images(&api);
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0]["img_state"]["state"], "IMAGE_FSM_IN_PROGRESS");

    // The connection drops halfway through the second chunk.
    {
        let addr = c.url.strip_prefix("http://").unwrap();
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "PUT /api/image-upload/{id} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {}\r\n\
             Content-Range: bytes {chunk}-{}/{total}\r\nContent-Length: {chunk}\r\n\r\n",
            base64_basic(),
            2 * chunk - 1
        )
        .unwrap();
        stream.write_all(&package[chunk..chunk + chunk / 2]).unwrap();
    }
    let offset = wait_for("the session to settle", || {
        let s = api.object(&format!("/api/image-upload/{id}"));
        Some(s["offset"].as_u64().unwrap())
    });
    assert_eq!(offset, chunk as u64, "an interrupted chunk does not count");
    // A chunk at the wrong offset is refused with the offset to use.
    let r = put_chunk(&api, &id, 2 * chunk, &package[2 * chunk..3 * chunk], total);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains(&format!("continues at offset {chunk}")), "{}", r.error());

    // The controller restarts; the session continues where it was.
    c.terminate();
    let c = start(data.path());
    let api = c.admin();
    assert_eq!(api.object(&format!("/api/image-upload/{id}"))["offset"], chunk);
    let mut at = chunk;
    while at < total {
        let end = (at + chunk).min(total);
        let r = put_chunk(&api, &id, at, &package[at..end], total);
        assert_eq!(r.status, 200, "{}", r.body);
        at = end;
    }
    let wrong = api.post(&format!("/api/image-upload/{id}/complete"), &json!({"sha256": "0".repeat(64)}));
    assert_eq!(wrong.status, 400, "{}", wrong.body);
    assert!(wrong.error().contains("hash mismatch"));
    assert_nothing_left(&c, &api, 0, 0);
    assert_eq!(api.get(&format!("/api/image-upload/{id}")).status, 404, "a refused session is gone");

    // Again, completely, with the right digest.
    let id = api.post("/api/image-upload", &json!({"size": total})).json()["uuid"].as_str().unwrap().to_string();
    let mut at = 0;
    while at < total {
        let end = (at + chunk).min(total);
        assert_eq!(put_chunk(&api, &id, at, &package[at..end], total).status, 200);
        at = end;
    }
    let done = api.post(&format!("/api/image-upload/{id}/complete"), &json!({"sha256": sha256_file(&path)}));
    assert_eq!(done.status, 201, "{}", done.body);
    let image = done.json();
    assert_eq!(image["img_state"]["state"], "IMAGE_FSM_COMPLETED");
    assert_eq!(image["se_info"]["hash"], sha256_file(&path).as_str());
    assert_nothing_left(&c, &api, 1, 1);
    assert!(std::fs::read_dir(c.data_dir.join("images/sessions")).unwrap().next().is_none());
}

#[test]
fn the_shell_uploads_with_progress_shows_and_deletes_images() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let package = big_package(&pkgs, "se_patch.pkg", "30.2.7", 20);
    let c = start(data.path());
    let (out, progress) = shell(&c, &format!("upload image filename {}", package.display()));
    let name = images(&c.admin())[0]["name"].as_str().unwrap().to_string();
    assert!(out.contains(&name) && out.contains("SYSERR_SUCCESS"), "{out}");
    assert!(progress.contains("100%") && progress.matches('\r').count() >= 3, "one redraw per chunk: {progress:?}");
    let (table, _) = shell(&c, "show image");
    let header = table.lines().find(|l| l.contains("Name")).unwrap();
    assert_eq!(
        header.split('|').map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>(),
        ["Name", "UUID", "Status", "Controller Nodes"]
    );
    // A single node is the one controller holding a copy (the leader records it within a second).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let table = loop {
        let (table, _) = shell(&c, "show image");
        if table.lines().any(|l| l.contains(&name) && l.contains("SYSERR_SUCCESS") && l.contains(" ok"))
            || std::time::Instant::now() > deadline
        {
            break table;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(table.lines().any(|l| l.contains(&name) && l.contains("SYSERR_SUCCESS") && l.contains(" ok")), "{table}");
    let (detail, _) = shell(&c, &format!("show image {name}"));
    assert!(
        detail.contains("Field") && detail.contains("IMAGE_FSM_COMPLETED") && detail.contains(&sha256_file(&package)),
        "{detail}"
    );
    let (deleted, _) = shell(&c, &format!("delete image {name}"));
    assert!(deleted.contains("Deleted"), "{deleted}");
    assert!(images(&c.admin()).is_empty());
}

/// The offset of the one open upload session on the controller's disk.
fn session_offset(c: &Controller) -> Option<u64> {
    let dir = c.data_dir.join("images/sessions");
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let path = e.path();
        let meta: Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
        (path.extension()? == "json").then(|| meta["offset"].as_u64()).flatten()
    })
}

fn signal(pid: u32, sig: i32) {
    unsafe { libc::kill(pid as i32, sig) };
}

#[test]
fn the_shell_waits_for_a_restarted_controller_and_resumes_from_its_offset() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let package = big_package(&pkgs, "se_patch.pkg", "30.2.7", 48);
    let c = start(data.path());
    let addr = c.url.trim_start_matches("http://").to_string();
    let home = temp_dir();
    let upload = shell_command(&c, &format!("upload image filename {}", package.display()))
        .env("HOME", home.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Frozen mid-upload, then killed: the chunk in flight gets no answer.
    wait_for("a chunk acknowledged", || session_offset(&c).filter(|o| *o > 0));
    signal(c.pid(), libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(300));
    c.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    let c = try_start(Launch { listen: &addr, ..Launch::plain(data.path()) }).expect("restarts on its address");
    let out = upload.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("retrying"), "{stderr}");
    assert!(stdout.contains("SYSERR_SUCCESS"), "{stdout}");
    let image = images(&c.admin()).into_iter().next().unwrap();
    assert_eq!(image["se_info"]["hash"], sha256_file(&package).as_str());

    // A session whose chunk reached the controller while its answer was lost (here: sent by
    // hand) is continued from the controller's offset, not refused.
    let api = c.admin();
    let second = big_package(&pkgs, "second.pkg", "30.2.8", 20);
    let bytes = std::fs::read(&second).unwrap();
    let id = api.post("/api/image-upload", &json!({"size": bytes.len()})).json()["uuid"].as_str().unwrap().to_string();
    assert_eq!(put_chunk(&api, &id, 0, &bytes[..3 << 20], bytes.len()).status, 200);
    let modified = std::fs::metadata(&second).unwrap().modified().unwrap();
    let tracker = json!({"sessions": [{
        "controller": c.url, "path": second, "size": bytes.len(),
        "modified_secs": modified.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), "session": id,
    }]});
    std::fs::write(home.path().join(".fulcrum_shell_uploads.json"), tracker.to_string()).unwrap();
    let out = shell_command(&c, &format!("upload image filename {}", second.display()))
        .env("HOME", home.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resuming the upload at 3.0 MiB"), "{stderr}");
    assert_eq!(images(&api).len(), 2);
}

#[test]
fn ctrl_c_stops_an_upload_that_the_same_command_resumes_or_delete_image_abandons() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let package = big_package(&pkgs, "se_patch.pkg", "30.2.7", 40);
    let c = start(data.path());
    let api = c.admin();
    let home = temp_dir();
    let command = format!("upload image filename {}", package.display());
    let interrupted = |c: &Controller| {
        let child = shell_command(c, &command)
            .env("HOME", home.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_for("a chunk acknowledged", || session_offset(c).filter(|o| *o > 0));
        // Ctrl-C while a chunk is in flight (the controller frozen, so it cannot finish first).
        signal(c.pid(), libc::SIGSTOP);
        signal(child.id(), libc::SIGINT);
        std::thread::sleep(Duration::from_millis(300));
        signal(c.pid(), libc::SIGCONT);
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let said = interrupted(&c);
    assert!(said.contains("upload interrupted at") && said.contains("run the same command again"), "{said}");
    let name = images(&api)[0]["name"].as_str().unwrap().to_string();
    assert!(said.contains(&format!("delete image {name}")), "{said}");
    assert_eq!(images(&api)[0]["img_state"]["state"], "IMAGE_FSM_IN_PROGRESS");

    // The same command again continues the same session.
    let out = shell_command(&c, &command).env("HOME", home.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resuming the upload at"), "{stderr}");
    assert_eq!(images(&api)[0]["img_state"]["state"], "IMAGE_FSM_COMPLETED");
    let (deleted, _) = shell(&c, &format!("delete image {name}"));
    assert!(deleted.contains("Deleted"), "{deleted}");

    // Interrupted again, then abandoned at once with delete image.
    let said = interrupted(&c);
    assert!(said.contains("upload interrupted at"), "{said}");
    let (deleted, _) = shell(&c, &format!("delete image {name}"));
    assert!(deleted.contains("Deleted"), "{deleted}");
    assert!(images(&api).is_empty());
    assert!(std::fs::read_dir(c.data_dir.join("images/sessions")).unwrap().next().is_none(), "the session is gone");
}

#[test]
fn a_conflicting_upload_shows_the_controllers_own_message() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let package = big_package(&pkgs, "se_patch.pkg", "30.2.7", 4);
    let c = start(data.path());
    shell(&c, &format!("upload image filename {}", package.display()));
    let out = shell_command(&c, &format!("upload image filename {}", package.display())).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("Error (409)") && stderr.contains("already exists"), "{stdout}{stderr}");
    assert!(!stderr.contains("not found"), "{stderr}");
}
