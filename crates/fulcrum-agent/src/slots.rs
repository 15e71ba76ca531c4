//! The agent's persisted state and its A/B slot rules. Pure: every transition is a method on
//! [`State`], saved by the caller, so the rules are tested without processes or a network.
//!
//! An install writes the new version into the slot that is not active, then starts a *trial*:
//! the new slot becomes active and the agent restarts into it. The trial ends well when the new
//! version reaches the controller and passes its health check, and ends by switching back when
//! it fails the check, misses its deadline, or restarts a second time before it is healthy (a
//! crash), like a boot counter.

use fulcrum_se_protocol::{Command, Event, HostedVs};
use serde::{Deserialize, Serialize};

pub const SLOTS: [&str; 2] = ["a", "b"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    pub command_id: u64,
    /// The slot to go back to.
    pub from: String,
    pub deadline_unix: u64,
    /// Starts of the agent since the switch.
    pub boots: u32,
    /// Run the slot's health check (an install) or only reconnect (a rollback).
    pub health_check: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub active: String,
    #[serde(default)]
    pub previous: Option<String>,
    #[serde(default)]
    pub trial: Option<Trial>,
    /// The newest command taken on, so none is run twice.
    #[serde(default)]
    pub last_command: u64,
    /// A command started and not finished (resumed after a restart).
    #[serde(default)]
    pub running: Option<Command>,
    /// Step reports not yet delivered to the controller.
    #[serde(default)]
    pub unsent: Vec<Event>,
    /// The virtual services this SE serves.
    #[serde(default)]
    pub hosted: Vec<HostedVs>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    Normal,
    /// The first start of a trial: reconnect, check health.
    Trial,
    /// Switch back, for this reason.
    Abandon(String),
}

impl Default for State {
    fn default() -> Self {
        State {
            active: SLOTS[0].into(),
            previous: None,
            trial: None,
            last_command: 0,
            running: None,
            unsent: Vec::new(),
            hosted: Vec::new(),
        }
    }
}

impl State {
    /// The slot an install writes into.
    pub fn spare(&self) -> &'static str {
        if self.active == SLOTS[0] { SLOTS[1] } else { SLOTS[0] }
    }

    /// Makes `to` active on trial; the current slot becomes the way back.
    pub fn begin_trial(&mut self, command_id: u64, to: &str, deadline_unix: u64, health_check: bool) {
        let from = std::mem::replace(&mut self.active, to.to_string());
        self.previous = Some(from.clone());
        self.trial = Some(Trial { command_id, from, deadline_unix, boots: 0, health_check });
    }

    /// Called at every start of the agent.
    pub fn boot(&mut self, now_unix: u64) -> Boot {
        let Some(trial) = &mut self.trial else { return Boot::Normal };
        trial.boots += 1;
        if trial.boots > 1 {
            Boot::Abandon("the new version restarted before it was found healthy".into())
        } else if now_unix > trial.deadline_unix {
            Boot::Abandon("the new version did not come up within its health timeout".into())
        } else {
            Boot::Trial
        }
    }

    pub fn trial_expired(&self, now_unix: u64) -> bool {
        self.trial.as_ref().is_some_and(|t| now_unix > t.deadline_unix)
    }

    /// The trial ended well: returns its command.
    pub fn commit(&mut self) -> Option<u64> {
        self.trial.take().map(|t| t.command_id)
    }

    /// The trial ended badly: back to the slot it came from. The failed slot is no rollback
    /// target (and the one before it was overwritten by the install), so there is none.
    /// Returns the trial's command.
    pub fn abandon(&mut self) -> Option<u64> {
        let trial = self.trial.take()?;
        self.active = trial.from;
        self.previous = None;
        Some(trial.command_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_install_trial_commits_after_one_healthy_start() {
        let mut s = State::default();
        assert_eq!(s.spare(), "b");
        s.begin_trial(7, "b", 100, true);
        assert_eq!((s.active.as_str(), s.previous.as_deref()), ("b", Some("a")));
        assert_eq!(s.boot(50), Boot::Trial);
        assert_eq!(s.commit(), Some(7));
        assert_eq!(s.boot(60), Boot::Normal);
        assert_eq!(s.spare(), "a");
    }

    #[test]
    fn a_second_start_or_a_missed_deadline_switches_back() {
        let mut s = State::default();
        s.begin_trial(7, "b", 100, true);
        assert_eq!(s.boot(50), Boot::Trial);
        assert!(matches!(s.boot(51), Boot::Abandon(r) if r.contains("restarted")));
        assert_eq!(s.abandon(), Some(7));
        assert_eq!((s.active.as_str(), s.previous.as_deref()), ("a", None));
        assert!(s.trial.is_none());

        let mut late = State::default();
        late.begin_trial(8, "b", 100, true);
        assert!(matches!(late.boot(101), Boot::Abandon(r) if r.contains("timeout")));
        assert!(late.trial_expired(101) && !late.trial_expired(99));
    }

    #[test]
    fn a_rollback_swaps_the_slots() {
        let mut s = State { active: "b".into(), previous: Some("a".into()), ..State::default() };
        s.begin_trial(9, "a", 100, false);
        assert_eq!((s.active.as_str(), s.previous.as_deref()), ("a", Some("b")));
        assert_eq!(s.boot(10), Boot::Trial);
        assert_eq!(s.commit(), Some(9));
    }
}
