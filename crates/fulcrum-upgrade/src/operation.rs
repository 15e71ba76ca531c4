//! An upgrade operation as it is stored: every step is recorded before it starts and after it
//! ends, so a controller that restarts picks it up where it stood. The executor (in the API
//! crate) asks this module what to do next and reports what happened.

use serde::{Deserialize, Serialize};

use crate::checks::CheckResult;
use crate::{ActionOnError, Ops, Version};

/// The controller's steps, by the product's task names.
pub const CONTROLLER_STEPS: [&str; 5] = [
    "COPY_AND_VERIFY_IMAGE",
    "INSTALL_IMAGE",
    "MIGRATE_CONFIG",
    "START_PRIMARY_CONTROLLER",
    "SET_CONTROLLER_UPGRADE_COMPLETED",
];
/// The step that restarts the controller into its new slot.
pub const RESTART_STEP: usize = 3;
/// The one step done once for the whole cluster (on the leader); every other step is done by
/// each controller node in turn.
pub const CLUSTER_WIDE_STEP: &str = "MIGRATE_CONFIG";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpState {
    #[serde(rename = "UPGRADE_FSM_INIT")]
    NotStarted,
    #[serde(rename = "UPGRADE_FSM_IN_PROGRESS")]
    InProgress,
    #[serde(rename = "UPGRADE_FSM_COMPLETED")]
    Completed,
    #[serde(rename = "UPGRADE_FSM_SUSPENDED")]
    Suspended,
    #[serde(rename = "UPGRADE_FSM_ERROR")]
    Error,
    /// Refused: warnings and no skip_warnings.
    #[serde(rename = "UPGRADE_PRE_CHECK_WARNING")]
    PreCheckWarning,
    /// Refused: a check failed with an error.
    #[serde(rename = "UPGRADE_PRE_CHECK_ERROR")]
    PreCheckError,
}

impl OpState {
    pub fn as_str(self) -> &'static str {
        match self {
            OpState::NotStarted => "UPGRADE_FSM_INIT",
            OpState::PreCheckWarning => "UPGRADE_PRE_CHECK_WARNING",
            OpState::PreCheckError => "UPGRADE_PRE_CHECK_ERROR",
            OpState::InProgress => "UPGRADE_FSM_IN_PROGRESS",
            OpState::Completed => "UPGRADE_FSM_COMPLETED",
            OpState::Suspended => "UPGRADE_FSM_SUSPENDED",
            OpState::Error => "UPGRADE_FSM_ERROR",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SeState {
    NotStarted,
    /// Its virtual services are moving off it.
    Draining,
    InProgress,
    Completed,
    Failed,
    AlreadyUpgraded,
    /// Put back to its version after the group's action_on_error said roll back.
    RolledBack,
}

impl SeState {
    pub fn is_final(self) -> bool {
        matches!(self, SeState::Completed | SeState::Failed | SeState::AlreadyUpgraded | SeState::RolledBack)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub task: String,
    pub start_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    /// `None` while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<bool>,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerRun {
    pub state: OpState,
    pub from: Version,
    pub to: Version,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_uuid: Option<String>,
    /// The next step to run, and whether it was started (a restart re-runs it).
    pub step: usize,
    pub step_started: bool,
    pub events: Vec<Event>,
    /// Every controller node of the cluster and the steps it has done (none listed: the one
    /// node this controller is, as before clusters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeRun>,
}

/// One controller node's part of the controller's steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRun {
    pub node: String,
    /// Where it is reached (`http://127.0.0.2:9443`).
    pub address: String,
    /// The steps it has finished.
    #[serde(default)]
    pub done: Vec<String>,
    #[serde(default)]
    pub events: Vec<Event>,
}

impl ControllerRun {
    /// The node to do `task` next, followers in name order first and `leader` last (it hands
    /// over its leadership before it restarts, so it goes when every other node is done);
    /// `None` when every node has done it.
    pub fn next_node(&self, task: &str, leader: &str) -> Option<usize> {
        let pending = |n: &NodeRun| !n.done.iter().any(|d| d == task);
        let mut order: Vec<usize> = (0..self.nodes.len()).filter(|i| pending(&self.nodes[*i])).collect();
        order.sort_by_key(|i| (self.nodes[*i].node == leader, self.nodes[*i].node.clone()));
        order.first().copied()
    }

    /// Steps done and in all, counting each node's share of the per-node steps.
    pub fn tasks(&self) -> (usize, usize) {
        let nodes = self.nodes.len().max(1);
        let per_node = CONTROLLER_STEPS.iter().filter(|s| **s != CLUSTER_WIDE_STEP).count();
        let total = per_node * nodes + 1;
        if self.state == OpState::Completed {
            return (total, total);
        }
        let done_on_nodes: usize = self.nodes.iter().map(|n| n.done.len()).sum();
        let done = if self.nodes.is_empty() {
            // Before clusters: one node, the finished steps.
            self.step
        } else {
            done_on_nodes
                + usize::from(self.step > CONTROLLER_STEPS.iter().position(|s| *s == CLUSTER_WIDE_STEP).unwrap_or(0))
        };
        (done.min(total), total)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeRun {
    pub uuid: String,
    pub name: String,
    pub state: SeState,
    pub from: Option<Version>,
    /// Where this SE goes (a rollback takes each SE to its own previous version).
    pub to: Option<Version>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<u64>,
    /// When the SE must have finished (unix seconds), once its install was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_unix: Option<u64>,
    /// Its command takes it back (the group's action_on_error is ROLLBACK).
    #[serde(default)]
    pub rolling_back: bool,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum GroupState {
    #[serde(rename = "SEGROUP_UPGRADE_NOT_STARTED")]
    NotStarted,
    #[serde(rename = "SEGROUP_UPGRADE_IN_PROGRESS")]
    InProgress,
    #[serde(rename = "SEGROUP_UPGRADE_COMPLETE")]
    Completed,
    #[serde(rename = "SEGROUP_UPGRADE_SUSPENDED")]
    Suspended,
    #[serde(rename = "SEGROUP_UPGRADE_ERROR")]
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRun {
    pub uuid: String,
    pub name: String,
    pub state: GroupState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_uuid: Option<String>,
    pub ses: Vec<SeRun>,
    /// Virtual services that lost service during the operation.
    pub disrupted_vs: Vec<String>,
    pub events: Vec<Event>,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub id: String,
    pub ops: Ops,
    /// Controller and every SE group.
    pub system: bool,
    pub state: OpState,
    pub action_on_error: ActionOnError,
    pub disruptive: bool,
    pub image_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<ControllerRun>,
    pub groups: Vec<GroupRun>,
    pub checks: Vec<CheckResult>,
    pub start_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    #[serde(default)]
    pub reason: String,
}

/// What the executor should do next for a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupAction {
    /// Start these SEs (indices), within the batch size.
    Start(Vec<usize>),
    /// Wait for the SEs in flight.
    Wait,
    /// Roll these completed SEs back (action_on_error ROLLBACK).
    RollBack(Vec<usize>),
    /// Nothing left: the group has ended in this state.
    Finish(GroupState),
}

impl GroupRun {
    /// Decides the group's next move, `batch` SEs at a time.
    pub fn next(&self, batch: usize, action: ActionOnError) -> GroupAction {
        if self.state != GroupState::InProgress {
            return GroupAction::Wait;
        }
        let in_flight = self.ses.iter().filter(|s| matches!(s.state, SeState::Draining | SeState::InProgress)).count();
        let failed = self.ses.iter().any(|s| s.state == SeState::Failed);
        if failed {
            match action {
                ActionOnError::Continue => {}
                ActionOnError::Suspend => {
                    return if in_flight == 0 { GroupAction::Finish(GroupState::Suspended) } else { GroupAction::Wait };
                }
                ActionOnError::Rollback => {
                    if in_flight > 0 {
                        return GroupAction::Wait;
                    }
                    let done: Vec<usize> = self
                        .ses
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.state == SeState::Completed)
                        .map(|(i, _)| i)
                        .collect();
                    return if done.is_empty() {
                        GroupAction::Finish(GroupState::Error)
                    } else {
                        GroupAction::RollBack(done)
                    };
                }
            }
        }
        let waiting: Vec<usize> =
            self.ses.iter().enumerate().filter(|(_, s)| s.state == SeState::NotStarted).map(|(i, _)| i).collect();
        if waiting.is_empty() {
            return if in_flight > 0 {
                GroupAction::Wait
            } else if failed {
                GroupAction::Finish(GroupState::Error)
            } else {
                GroupAction::Finish(GroupState::Completed)
            };
        }
        let room = batch.max(1).saturating_sub(in_flight);
        if room == 0 { GroupAction::Wait } else { GroupAction::Start(waiting.into_iter().take(room).collect()) }
    }

    /// A suspended group goes on: failed SEs are tried again.
    pub fn resume(&mut self) {
        for se in &mut self.ses {
            if se.state == SeState::Failed {
                se.state = SeState::NotStarted;
                se.command_id = None;
                se.deadline_unix = None;
            }
        }
        self.state = GroupState::InProgress;
        self.reason.clear();
    }
}

impl Operation {
    pub fn is_running(&self) -> bool {
        self.state == OpState::InProgress
    }

    /// Tasks done and in total: the controller's steps and one per SE.
    pub fn tasks(&self) -> (usize, usize) {
        let (mut done, mut total) = (0, 0);
        if let Some(c) = &self.controller {
            let (c_done, c_total) = c.tasks();
            total += c_total;
            done += c_done;
        }
        for g in &self.groups {
            total += g.ses.len();
            done += g.ses.iter().filter(|s| s.state.is_final()).count();
        }
        (done, total)
    }

    pub fn progress(&self) -> u8 {
        let (done, total) = self.tasks();
        if total == 0 || self.state == OpState::Completed { 100 } else { (done * 100 / total).min(100) as u8 }
    }

    /// SE groups start once the controller's part is done.
    pub fn groups_may_run(&self) -> bool {
        self.controller.as_ref().is_none_or(|c| c.state == OpState::Completed)
    }

    /// The operation's state from its parts (called whenever a part changes).
    pub fn settle(&mut self) -> OpState {
        if !self.is_running() {
            return self.state;
        }
        if let Some(c) = &self.controller {
            match c.state {
                OpState::Error => return self.end(OpState::Error),
                OpState::InProgress => return self.state,
                _ => {}
            }
        }
        let states: Vec<GroupState> = self.groups.iter().map(|g| g.state).collect();
        if states.iter().any(|s| matches!(s, GroupState::InProgress | GroupState::NotStarted)) {
            return self.state;
        }
        if states.contains(&GroupState::Suspended) {
            self.state = OpState::Suspended;
            return self.state;
        }
        if states.contains(&GroupState::Error) {
            return self.end(OpState::Error);
        }
        self.end(OpState::Completed)
    }

    fn end(&mut self, state: OpState) -> OpState {
        self.state = state;
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn se(state: SeState) -> SeRun {
        SeRun {
            uuid: "se".into(),
            name: "se".into(),
            state,
            from: None,
            to: None,
            command_id: None,
            deadline_unix: None,
            rolling_back: false,
            message: String::new(),
        }
    }

    fn group(states: &[SeState]) -> GroupRun {
        GroupRun {
            uuid: "g".into(),
            name: "g".into(),
            state: GroupState::InProgress,
            image_uuid: None,
            ses: states.iter().map(|s| se(*s)).collect(),
            disrupted_vs: vec![],
            events: vec![],
            reason: String::new(),
        }
    }

    use SeState::*;

    fn controller_run(nodes: &[(&str, &[&str])]) -> ControllerRun {
        let v = Version { version: "30.2.1".into(), build: 9001, patch: None };
        ControllerRun {
            state: OpState::InProgress,
            from: v.clone(),
            to: v,
            image_uuid: None,
            step: 0,
            step_started: false,
            events: vec![],
            nodes: nodes
                .iter()
                .map(|(name, done)| NodeRun {
                    node: name.to_string(),
                    address: format!("http://{name}"),
                    done: done.iter().map(|d| d.to_string()).collect(),
                    events: vec![],
                })
                .collect(),
        }
    }

    #[test]
    fn followers_go_first_in_name_order_and_the_leader_last() {
        let c = controller_run(&[("c", &[]), ("a", &[]), ("b", &[])]);
        assert_eq!(c.next_node("COPY_AND_VERIFY_IMAGE", "a"), Some(2), "b: a follower, first by name");
        let c = controller_run(&[("c", &[]), ("a", &[]), ("b", &["START_PRIMARY_CONTROLLER"])]);
        assert_eq!(c.next_node("START_PRIMARY_CONTROLLER", "a"), Some(0));
        let c =
            controller_run(&[("c", &["START_PRIMARY_CONTROLLER"]), ("a", &[]), ("b", &["START_PRIMARY_CONTROLLER"])]);
        assert_eq!(c.next_node("START_PRIMARY_CONTROLLER", "a"), Some(1), "the leader when the rest are done");
        // After the handover, the new leader finds the old one still to do.
        assert_eq!(c.next_node("START_PRIMARY_CONTROLLER", "b"), Some(1));
        let done = controller_run(&[("a", &["INSTALL_IMAGE"]), ("b", &["INSTALL_IMAGE"])]);
        assert_eq!(done.next_node("INSTALL_IMAGE", "a"), None);
    }

    #[test]
    fn controller_tasks_count_each_nodes_steps_and_the_migration_once() {
        let mut c = controller_run(&[("a", &[]), ("b", &[]), ("c", &[])]);
        assert_eq!(c.tasks(), (0, 13));
        c.nodes[0].done = vec!["COPY_AND_VERIFY_IMAGE".into(), "INSTALL_IMAGE".into()];
        c.nodes[1].done = vec!["COPY_AND_VERIFY_IMAGE".into()];
        c.step = 1;
        assert_eq!(c.tasks(), (3, 13));
        c.step = 3;
        assert_eq!(c.tasks().0, 4, "the migration counts once passed");
        c.state = OpState::Completed;
        assert_eq!(c.tasks(), (13, 13));
        let single = ControllerRun { step: 2, ..controller_run(&[]) };
        assert_eq!(single.tasks(), (2, 5), "a record from before clusters counts its steps");
    }

    #[test]
    fn rolling_batches() {
        let g = group(&[NotStarted, NotStarted, NotStarted]);
        assert_eq!(g.next(2, ActionOnError::Suspend), GroupAction::Start(vec![0, 1]));
        let g = group(&[InProgress, NotStarted, NotStarted]);
        assert_eq!(g.next(1, ActionOnError::Suspend), GroupAction::Wait);
        assert_eq!(g.next(2, ActionOnError::Suspend), GroupAction::Start(vec![1]));
        let g = group(&[Completed, AlreadyUpgraded, Completed]);
        assert_eq!(g.next(1, ActionOnError::Suspend), GroupAction::Finish(GroupState::Completed));
    }

    #[test]
    fn each_action_on_error() {
        let g = group(&[Completed, Failed, NotStarted]);
        assert_eq!(g.next(1, ActionOnError::Suspend), GroupAction::Finish(GroupState::Suspended));
        assert_eq!(g.next(1, ActionOnError::Continue), GroupAction::Start(vec![2]));
        assert_eq!(g.next(1, ActionOnError::Rollback), GroupAction::RollBack(vec![0]));
        let in_flight = group(&[InProgress, Failed, NotStarted]);
        assert_eq!(in_flight.next(2, ActionOnError::Suspend), GroupAction::Wait, "lets what runs finish");
        let ended = group(&[Completed, Failed, Completed]);
        assert_eq!(ended.next(1, ActionOnError::Continue), GroupAction::Finish(GroupState::Error));
        let rolled = group(&[RolledBack, Failed, NotStarted]);
        assert_eq!(rolled.next(1, ActionOnError::Rollback), GroupAction::Finish(GroupState::Error));
    }

    #[test]
    fn resume_retries_the_failed() {
        let mut g = group(&[Completed, Failed, NotStarted]);
        g.state = GroupState::Suspended;
        g.resume();
        assert_eq!(g.state, GroupState::InProgress);
        assert_eq!(g.next(1, ActionOnError::Suspend), GroupAction::Start(vec![1]));
    }

    #[test]
    fn the_operation_settles_from_its_parts() {
        let mut op = Operation {
            id: "op".into(),
            ops: Ops::Upgrade,
            system: true,
            state: OpState::InProgress,
            action_on_error: ActionOnError::Suspend,
            disruptive: false,
            image_name: None,
            controller: None,
            groups: vec![group(&[Completed]), group(&[NotStarted])],
            checks: vec![],
            start_time: String::new(),
            end_time: None,
            reason: String::new(),
        };
        assert_eq!(op.progress(), 50);
        op.groups[0].state = GroupState::Completed;
        assert_eq!(op.settle(), OpState::InProgress);
        op.groups[1].state = GroupState::Suspended;
        assert_eq!(op.settle(), OpState::Suspended);
        op.state = OpState::InProgress;
        op.groups[1].state = GroupState::Completed;
        assert_eq!(op.settle(), OpState::Completed);
        assert_eq!(op.progress(), 100);
    }
}
