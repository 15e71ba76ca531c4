//! Which SEs serve which virtual service: pure, deterministic, and sticky (a virtual service
//! stays where it is while its SE can keep it, so re-placing never moves what need not move).

use std::collections::{BTreeMap, HashMap};

/// The placement settings of an SE group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLimits {
    pub max_vs_per_se: usize,
    pub min_scaleout_per_vs: usize,
    /// PLACEMENT_ALGO_PACKED fills the busiest SE that has room; DISTRIBUTED the least busy.
    pub packed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub uuid: String,
    pub name: String,
    pub group: String,
    /// May take new virtual services (up, enabled, licensed, not restarting).
    pub takes_new: bool,
    /// May keep the ones it has (`takes_new`, or disabled for placement only).
    pub keeps: bool,
    /// Up and not restarting: it can go on serving what it serves while a successor takes over.
    pub alive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    pub uuid: String,
    pub group: String,
}

/// Virtual service uuid → the SEs it runs on, first one primary.
pub type Placement = BTreeMap<String, Vec<String>>;

pub fn place(
    groups: &HashMap<String, GroupLimits>,
    ses: &[Candidate],
    demands: &[Demand],
    current: &Placement,
) -> Placement {
    let by_uuid: HashMap<&str, &Candidate> = ses.iter().map(|c| (c.uuid.as_str(), c)).collect();
    let mut load: HashMap<&str, usize> = HashMap::new();
    let mut out = Placement::new();
    let mut sorted: Vec<&Demand> = demands.iter().collect();
    sorted.sort_by(|a, b| a.uuid.cmp(&b.uuid));
    // First what stays: every demand keeps the SEs it has while they can keep it.
    for demand in &sorted {
        let Some(limits) = groups.get(&demand.group) else { continue };
        let mut kept = Vec::new();
        for se in current.get(&demand.uuid).into_iter().flatten() {
            let Some(c) = by_uuid.get(se.as_str()) else { continue };
            let used = load.entry(c.uuid.as_str()).or_default();
            if c.keeps
                && c.group == demand.group
                && *used < limits.max_vs_per_se
                && kept.len() < limits.min_scaleout_per_vs
            {
                *used += 1;
                kept.push(c.uuid.clone());
            }
        }
        out.insert(demand.uuid.clone(), kept);
    }
    // Then what is missing, SE by SE as the group's algorithm prefers.
    for demand in &sorted {
        let Some(limits) = groups.get(&demand.group) else { continue };
        let assigned = out.get_mut(&demand.uuid).expect("inserted above");
        while assigned.len() < limits.min_scaleout_per_vs {
            let best = ses
                .iter()
                .filter(|c| c.takes_new && c.group == demand.group && !assigned.contains(&c.uuid))
                .map(|c| (c, load.get(c.uuid.as_str()).copied().unwrap_or(0)))
                .filter(|(_, used)| *used < limits.max_vs_per_se)
                .min_by(|(a, la), (b, lb)| {
                    let by_load = if limits.packed { lb.cmp(la) } else { la.cmp(lb) };
                    by_load.then_with(|| a.name.cmp(&b.name)).then_with(|| a.uuid.cmp(&b.uuid))
                });
            let Some((chosen, _)) = best else { break };
            *load.entry(chosen.uuid.as_str()).or_default() += 1;
            assigned.push(chosen.uuid.clone());
        }
    }
    out
}

/// Make before break: an SE losing a virtual service to another keeps it (after the new ones)
/// until one of the SEs it goes to serves it, as long as the SE losing it is alive. So a
/// virtual service that moves (an SE drained for its upgrade) is served throughout.
pub fn hand_over(
    previous: &Placement,
    mut next: Placement,
    alive: &dyn Fn(&str) -> bool,
    serves: &dyn Fn(&str, &str) -> bool,
) -> Placement {
    for (vs, ses) in next.iter_mut() {
        let Some(before) = previous.get(vs) else { continue };
        // With nowhere to go, or once one of the SEs it stays on serves it, nothing is held.
        if ses.is_empty() || ses.iter().any(|se| serves(se, vs)) {
            continue;
        }
        let leaving: Vec<String> = before.iter().filter(|se| !ses.contains(se) && alive(se)).cloned().collect();
        ses.extend(leaving);
    }
    next
}

/// SE uuid → the virtual services on it.
pub fn by_se(placement: &Placement) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for (vs, ses) in placement {
        for se in ses {
            out.entry(se.clone()).or_default().push(vs.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn se(uuid: &str, group: &str, up: bool) -> Candidate {
        Candidate { uuid: uuid.into(), name: uuid.into(), group: group.into(), takes_new: up, keeps: up, alive: up }
    }

    fn vs(uuid: &str, group: &str) -> Demand {
        Demand { uuid: uuid.into(), group: group.into() }
    }

    fn limits(max: usize, min_scaleout: usize, packed: bool) -> HashMap<String, GroupLimits> {
        HashMap::from([(
            "g".to_string(),
            GroupLimits { max_vs_per_se: max, min_scaleout_per_vs: min_scaleout, packed },
        )])
    }

    #[test]
    fn places_within_the_group_and_its_limits() {
        let ses = [se("se1", "g", true), se("se2", "g", true), se("other", "h", true)];
        let demands = [vs("v1", "g"), vs("v2", "g"), vs("v3", "g")];
        let p = place(&limits(1, 1, false), &ses, &demands, &Placement::new());
        assert_eq!(p["v1"], ["se1"]);
        assert_eq!(p["v2"], ["se2"]);
        assert!(p["v3"].is_empty(), "max_vs_per_se 1 leaves the third unplaced: {p:?}");
        let p = place(&limits(10, 2, false), &ses, &demands, &Placement::new());
        assert!(p.values().all(|s| s.len() == 2 && !s.contains(&"other".to_string())));
    }

    #[test]
    fn packed_fills_one_se_distributed_spreads() {
        let ses = [se("se1", "g", true), se("se2", "g", true)];
        let demands = [vs("v1", "g"), vs("v2", "g")];
        let packed = place(&limits(10, 1, true), &ses, &demands, &Placement::new());
        assert_eq!(packed["v1"], packed["v2"]);
        let spread = place(&limits(10, 1, false), &ses, &demands, &Placement::new());
        assert_ne!(spread["v1"], spread["v2"]);
    }

    #[test]
    fn sticky_and_moves_off_an_se_that_went_down() {
        let demands = [vs("v1", "g"), vs("v2", "g")];
        let current = Placement::from([("v1".to_string(), vec!["se2".to_string()]), ("v2".into(), vec!["se2".into()])]);
        let up = [se("se1", "g", true), se("se2", "g", true)];
        assert_eq!(place(&limits(10, 1, false), &up, &demands, &current), current, "nothing moves needlessly");
        let se2_down = [se("se1", "g", true), se("se2", "g", false)];
        let moved = place(&limits(10, 1, false), &se2_down, &demands, &current);
        assert_eq!(moved["v1"], ["se1"]);
        assert_eq!(moved["v2"], ["se1"]);
        let none_up = [se("se1", "g", false), se("se2", "g", false)];
        assert!(place(&limits(10, 1, false), &none_up, &demands, &current).values().all(Vec::is_empty));
    }

    #[test]
    fn a_moving_virtual_service_stays_on_its_old_se_until_the_new_one_serves_it() {
        let previous = Placement::from([("v1".to_string(), vec!["se1".to_string()])]);
        let next = Placement::from([("v1".to_string(), vec!["se2".to_string()])]);
        let alive = |_: &str| true;
        let waiting = hand_over(&previous, next.clone(), &alive, &|_, _| false);
        assert_eq!(waiting["v1"], ["se2", "se1"], "the new SE first (primary), the old one until then");
        // The next round starts from what was placed, the old SE included.
        let still = hand_over(&waiting, next.clone(), &alive, &|_, _| false);
        assert_eq!(still["v1"], ["se2", "se1"]);
        let served = hand_over(&waiting, next.clone(), &alive, &|se, vs| se == "se2" && vs == "v1");
        assert_eq!(served["v1"], ["se2"], "once the new SE serves it, the old one lets go");
        let dead = hand_over(&previous, next.clone(), &|se| se != "se1", &|_, _| false);
        assert_eq!(dead["v1"], ["se2"], "a dead SE keeps nothing");
        // Scaling in onto an SE that serves it, and new virtual services, are not held back.
        let two = Placement::from([("v1".to_string(), vec!["se1".to_string(), "se2".to_string()])]);
        assert_eq!(hand_over(&two, next.clone(), &alive, &|se, _| se == "se2")["v1"], ["se2"]);
        assert_eq!(hand_over(&Placement::new(), next.clone(), &alive, &|_, _| false), next);
        let nowhere = Placement::from([("v1".to_string(), vec![])]);
        assert!(hand_over(&previous, nowhere, &alive, &|_, _| false)["v1"].is_empty(), "nowhere to go holds nothing");
    }

    #[test]
    fn disabled_for_placement_keeps_but_takes_nothing_new() {
        let mut draining = se("se1", "g", true);
        draining.takes_new = false;
        let current = Placement::from([("v1".to_string(), vec!["se1".to_string()])]);
        let p =
            place(&limits(10, 1, true), &[draining, se("se2", "g", true)], &[vs("v1", "g"), vs("v2", "g")], &current);
        assert_eq!(p["v1"], ["se1"]);
        assert_eq!(p["v2"], ["se2"]);
        assert_eq!(by_se(&p)["se2"], ["v2"]);
    }
}
