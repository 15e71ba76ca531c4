//! Which server takes the next request: round robin, least connections and consistent hash on
//! the client's address, each weighted by the servers' `ratio`. Pure: a [`Plan`] is built once
//! per pool configuration and asked per request, with the caller saying which servers are
//! usable now (enabled and healthy) and how loaded each is.

use std::net::IpAddr;

use fulcrum_se_protocol::Algorithm;

/// Points on the hash ring per unit of ratio: enough to spread load evenly, few enough to
/// build a ring of 5,000 servers in a few milliseconds.
const POINTS_PER_RATIO: u32 = 16;

#[derive(Debug, Clone)]
pub struct Plan {
    algorithm: Algorithm,
    ratios: Vec<u32>,
    /// Round robin: server indices in turn, each as often as its ratio, interleaved.
    schedule: Vec<u32>,
    /// Consistent hash: (point, server index), sorted by point.
    ring: Vec<(u64, u32)>,
}

impl Plan {
    /// `keys` name the servers (`ip:port`): the ring places them by name, so a server keeps
    /// its clients when others come and go.
    pub fn new(algorithm: Algorithm, keys: &[String], ratios: &[u32]) -> Plan {
        let ratios: Vec<u32> = ratios.iter().map(|r| (*r).max(1)).collect();
        let schedule = match algorithm {
            Algorithm::RoundRobin => schedule(&ratios),
            _ => Vec::new(),
        };
        let ring = match algorithm {
            Algorithm::ConsistentHash => ring(keys, &ratios),
            _ => Vec::new(),
        };
        Plan { algorithm, ratios, schedule, ring }
    }

    pub fn len(&self) -> usize {
        self.ratios.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ratios.is_empty()
    }

    /// The server for the next request. `tick` grows with every request (it rotates round
    /// robin and breaks ties); `usable(i)` says whether server `i` may take it; `load(i)` is
    /// its open requests or connections.
    pub fn pick(
        &self,
        tick: usize,
        client: Option<IpAddr>,
        usable: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> u64,
    ) -> Option<usize> {
        let n = self.ratios.len();
        if n == 0 {
            return None;
        }
        match self.algorithm {
            Algorithm::RoundRobin => {
                let len = self.schedule.len();
                let first = self.schedule[tick % len] as usize;
                if usable(first) {
                    return Some(first);
                }
                // A turn that falls on an unusable server goes to the usable ones in their
                // proportions (not simply to the next in line, which would favour it).
                let open: Vec<usize> = self.schedule.iter().map(|i| *i as usize).filter(|i| usable(*i)).collect();
                (!open.is_empty()).then(|| open[tick % open.len()])
            }
            Algorithm::LeastConnections => {
                let mut best: Option<(usize, u64)> = None;
                for k in 0..n {
                    let i = (tick + k) % n;
                    if !usable(i) {
                        continue;
                    }
                    let l = load(i);
                    // l / ratio < best_l / best_ratio, without division.
                    let better = match best {
                        None => true,
                        Some((b, bl)) => {
                            u128::from(l) * u128::from(self.ratios[b]) < u128::from(bl) * u128::from(self.ratios[i])
                        }
                    };
                    if better {
                        best = Some((i, l));
                    }
                }
                best.map(|(i, _)| i)
            }
            Algorithm::ConsistentHash => {
                let point = client.map_or(tick as u64, |ip| hash(ip.to_string().as_bytes(), 0));
                let start = self.ring.partition_point(|(p, _)| *p < point);
                let len = self.ring.len();
                (0..len).map(|k| self.ring[(start + k) % len].1 as usize).find(|i| usable(*i))
            }
        }
    }
}

/// Rounds: round `r` takes every server whose ratio is at least `r`, so a ratio-3 server is
/// in three rounds and a ratio-1 server in one, and no server comes twice in a row when it
/// can be helped.
fn schedule(ratios: &[u32]) -> Vec<u32> {
    let max = ratios.iter().copied().max().unwrap_or(1);
    let mut out = Vec::with_capacity(ratios.iter().map(|r| *r as usize).sum());
    for round in 1..=max {
        out.extend((0..ratios.len() as u32).filter(|i| ratios[*i as usize] >= round));
    }
    out
}

fn ring(keys: &[String], ratios: &[u32]) -> Vec<(u64, u32)> {
    let mut ring = Vec::with_capacity(ratios.iter().map(|r| (r * POINTS_PER_RATIO) as usize).sum());
    for (i, (key, ratio)) in keys.iter().zip(ratios).enumerate() {
        for point in 0..ratio * POINTS_PER_RATIO {
            ring.push((hash(key.as_bytes(), u64::from(point)), i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

/// FNV-1a finished with splitmix64: stable across builds and SEs (std's hasher promises
/// neither), and well mixed for ring points.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    fn counts(plan: &Plan, rounds: usize, usable: impl Fn(usize) -> bool) -> Vec<usize> {
        let mut c = vec![0; plan.len()];
        for tick in 0..rounds {
            c[plan.pick(tick, None, &usable, |_| 0).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn round_robin_follows_ratios_and_skips_what_is_unusable() {
        let plan = Plan::new(Algorithm::RoundRobin, &keys(3), &[1, 3, 1]);
        assert_eq!(counts(&plan, 500, |_| true), [100, 300, 100]);
        assert_eq!(counts(&plan, 500, |i| i != 1), [250, 0, 250]);
        assert_eq!(plan.pick(0, None, |_| false, |_| 0), None);
        // Round by round: every server in the first, then the ones with a higher ratio.
        let first: Vec<usize> = (0..5).map(|t| plan.pick(t, None, |_| true, |_| 0).unwrap()).collect();
        assert_eq!(first, [0, 1, 2, 1, 1]);
    }

    #[test]
    fn least_connections_weighs_load_by_ratio() {
        let plan = Plan::new(Algorithm::LeastConnections, &keys(3), &[1, 2, 1]);
        let load = [3u64, 5, 4];
        // 3/1, 5/2 = 2.5, 4/1: the second server.
        assert_eq!(plan.pick(0, None, |_| true, |i| load[i]), Some(1));
        assert_eq!(plan.pick(0, None, |i| i != 1, |i| load[i]), Some(0));
        // Ties rotate with the tick.
        let idle = Plan::new(Algorithm::LeastConnections, &keys(3), &[1, 1, 1]);
        let picks: Vec<usize> = (0..3).map(|t| idle.pick(t, None, |_| true, |_| 0).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2]);
    }

    #[test]
    fn consistent_hash_keeps_clients_on_their_server() {
        let plan = Plan::new(Algorithm::ConsistentHash, &keys(10), &[1; 10]);
        let client = |i: u8| Some(IpAddr::from([192, 168, 1, i]));
        for i in 0..50 {
            let a = plan.pick(0, client(i), |_| true, |_| 0);
            assert_eq!(a, plan.pick(99, client(i), |_| true, |_| 0), "the same client, the same server");
        }
        let spread: std::collections::HashSet<usize> =
            (0..=255).filter_map(|i| plan.pick(0, client(i), |_| true, |_| 0)).collect();
        assert!(spread.len() >= 8, "clients spread over the servers: {spread:?}");
    }

    proptest! {
        #[test]
        fn a_pick_is_always_usable(
            algorithm in prop_oneof![Just(Algorithm::RoundRobin), Just(Algorithm::LeastConnections), Just(Algorithm::ConsistentHash)],
            ratios in proptest::collection::vec(1u32..=20, 1..30),
            usable in proptest::collection::vec(any::<bool>(), 30),
            tick in 0usize..10_000,
            client in any::<[u8; 4]>(),
        ) {
            let plan = Plan::new(algorithm, &keys(ratios.len()), &ratios);
            let picked = plan.pick(tick, Some(IpAddr::from(client)), |i| usable[i], |i| i as u64 % 3);
            let any_usable = (0..ratios.len()).any(|i| usable[i]);
            prop_assert_eq!(picked.is_some(), any_usable);
            if let Some(i) = picked {
                prop_assert!(usable[i]);
            }
        }

        #[test]
        fn removing_a_server_moves_only_its_clients(n in 3usize..20, gone in 0usize..20, seed in any::<u8>()) {
            let gone = gone % n;
            let plan = Plan::new(Algorithm::ConsistentHash, &keys(n), &vec![1; n]);
            for i in 0..=255u8 {
                let client = Some(IpAddr::from([10, seed, 1, i]));
                let before = plan.pick(0, client, |_| true, |_| 0).unwrap();
                let after = plan.pick(0, client, |s| s != gone, |_| 0).unwrap();
                if before != gone {
                    prop_assert_eq!(before, after);
                }
            }
        }
    }
}
