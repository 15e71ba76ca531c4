//! Async PATCH: accepted requests per second with many clients, the time of one merge cycle
//! that applies them (100,000 server adds over 100 pools by default), and the same adds sent as
//! synchronous PATCHes in the same run.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{AsyncArgs, Common, basic, run_load, start_fulcrum};

fn server(i: usize) -> Value {
    json!({"ip": {"addr": format!("10.{}.{}.{}", i / 65536 % 256, i / 256 % 256, i % 256), "type": "V4"}})
}

fn make_pools(url: &str, auth: &str, prefix: &str, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let created: Value = ureq::post(&format!("{url}/api/pool"))
                .set("Authorization", auth)
                .send_json(json!({"name": format!("{prefix}-{i}")}))
                .expect("create pool")
                .into_json()
                .unwrap();
            created["uuid"].as_str().unwrap().to_string()
        })
        .collect()
}

fn set_period(url: &str, auth: &str, seconds: u64) {
    ureq::request("PATCH", &format!("{url}/api/controllerproperties"))
        .set("Authorization", auth)
        .send_json(json!({"replace": {"async_patch_merge_period": seconds}}))
        .expect("set the merge period");
}

pub fn run(common: &Common, args: &AsyncArgs) {
    println!("\n== async PATCH: {} server adds over {} pools, {} clients", args.adds, args.pools, args.clients);
    let fulcrum = start_fulcrum(&common.fulcrum);
    let (url, auth) = (fulcrum.url.clone(), basic());
    // The longest period: the timer stays out of the measurement, the merge is triggered.
    set_period(&url, &auth, 120);
    let pools = make_pools(&url, &auth, "async", args.pools);
    // Requests are prepared before the clock starts: the load generator shares the 2 cores with
    // the controller, so it should spend them on sending, not on building JSON.
    let requests: Vec<(String, Vec<u8>)> = (0..args.adds)
        .map(|i| {
            let path = format!("{url}/api/pool/{}?async_mode", pools[i % pools.len()]);
            (path, json!({"add": {"servers": [server(i)]}}).to_string().into_bytes())
        })
        .collect();
    let a = auth.clone();
    let accepted = run_load(args.clients, args.adds, move |agent, i| {
        let (path, body) = &requests[i];
        let r = agent
            .request("PATCH", path)
            .set("Authorization", &a)
            .set("Content-Type", "application/json")
            .send_bytes(body)
            .expect("async patch");
        assert_eq!(r.status(), 202);
    });
    println!("accepted async PATCHes: {accepted:>10.0}/s (target >= 20000/s)");
    let started = Instant::now();
    let report: Value = ureq::post(&format!("{url}/api/pool-async/merge"))
        .set("Authorization", &auth)
        .timeout(Duration::from_secs(600))
        .send_json(json!({}))
        .expect("merge")
        .into_json()
        .unwrap();
    let merge = started.elapsed().as_secs_f64();
    assert_eq!(report["succeeded"].as_u64(), Some(args.adds as u64), "{report}");
    println!(
        "one merge cycle applying {} adds over {} pools: {merge:.2} s (target < 2 s)",
        report["merged"], report["pools"]
    );

    if args.sync_adds == 0 {
        return;
    }
    set_period(&url, &auth, 0);
    let sync_pools = make_pools(&url, &auth, "sync", args.pools);
    let (u, a) = (url.clone(), auth.clone());
    let started = Instant::now();
    let rate = run_load(args.clients, args.sync_adds, move |agent, i| {
        let path = format!("{u}/api/pool/{}", sync_pools[i % sync_pools.len()]);
        let r = agent
            .request("PATCH", &path)
            .set("Authorization", &a)
            .send_json(json!({"add": {"servers": [server(i)]}}))
            .expect("patch");
        assert_eq!(r.status(), 200);
        std::io::copy(&mut r.into_reader(), &mut std::io::sink()).unwrap();
    });
    let sync_secs = started.elapsed().as_secs_f64();
    println!(
        "{} of the same adds as synchronous PATCHes: {sync_secs:.1} s ({rate:.0}/s); async: {:.1} s to accept {} + {merge:.2} s to merge",
        args.sync_adds,
        args.adds as f64 / accepted,
        args.adds
    );
}
