//! A small linearizability checker (Wing & Gong's search with Lowe's memoisation, as in
//! Porcupine and Knossos) for histories recorded by the cluster tests, with the two models they
//! need: a register and a set.
//!
//! An operation has the time it was sent and, when its answer was definite, the time the answer
//! came. An operation whose outcome is unknown (a timeout, a 503 while passed on) has no end:
//! it may take effect at any moment after it was sent, or never (it is then linearised after
//! everything, where no read can see it).

use std::collections::HashSet;
use std::hash::Hash;
use std::time::Instant;

/// What the object may be and what operations do to it.
pub trait Model {
    type State: Clone + Eq + Hash;
    type Op;
    fn init(&self) -> Self::State;
    /// The state after `op` if `op` (with the output it observed) is possible in `state`.
    fn step(&self, state: &Self::State, op: &Self::Op) -> Option<Self::State>;
    /// Whether no operation of the history could have observed `op` (a write whose value no
    /// read saw). Such an operation of unknown outcome can always go last, so the search leaves
    /// it out instead of trying it at every point.
    fn unobserved(&self, _op: &Self::Op, _history: &[Operation<Self::Op>]) -> bool {
        false
    }
}

/// One operation of a history.
#[derive(Debug, Clone)]
pub struct Operation<Op> {
    pub op: Op,
    pub called: Instant,
    /// `None`: the outcome is unknown.
    pub returned: Option<Instant>,
}

/// A register: writes of values, reads that saw one (`None`: never written).
pub struct Register;

#[derive(Debug, Clone)]
pub enum RegisterOp {
    Write(String),
    Read(Option<String>),
}

impl Model for Register {
    type State = Option<String>;
    type Op = RegisterOp;
    fn init(&self) -> Option<String> {
        None
    }
    fn step(&self, state: &Option<String>, op: &RegisterOp) -> Option<Option<String>> {
        match op {
            RegisterOp::Write(v) => Some(Some(v.clone())),
            RegisterOp::Read(seen) => (seen == state).then(|| state.clone()),
        }
    }
    fn unobserved(&self, op: &RegisterOp, history: &[Operation<RegisterOp>]) -> bool {
        let RegisterOp::Write(v) = op else { return false };
        !history.iter().any(|o| matches!(&o.op, RegisterOp::Read(Some(seen)) if seen == v))
    }
}

/// A set: additions, removals, reads of the whole set. Elements are small numbers (see
/// [`Elements`]) and a set is a bit set, so that a step of the search costs little.
pub struct Set;

#[derive(Debug, Clone)]
pub enum SetOp {
    Add(usize),
    Remove(usize),
    Read(Bits),
}

/// A set of small numbers, without trailing zero words (so equal sets are equal vectors).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Bits(Vec<u64>);

impl Bits {
    pub fn of(items: impl IntoIterator<Item = usize>) -> Bits {
        let mut bits = Bits::default();
        for i in items {
            bits.insert(i);
        }
        bits
    }
    fn insert(&mut self, i: usize) {
        if self.0.len() <= i / 64 {
            self.0.resize(i / 64 + 1, 0);
        }
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn remove(&mut self, i: usize) {
        if let Some(word) = self.0.get_mut(i / 64) {
            *word &= !(1 << (i % 64));
        }
        while self.0.last() == Some(&0) {
            self.0.pop();
        }
    }
    fn contains(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// Numbers for a set's elements, as a history meets them.
#[derive(Default)]
pub struct Elements(std::collections::HashMap<String, usize>);

impl Elements {
    pub fn id(&mut self, element: &str) -> usize {
        let next = self.0.len();
        *self.0.entry(element.to_string()).or_insert(next)
    }
    pub fn set<'a>(&mut self, elements: impl IntoIterator<Item = &'a str>) -> Bits {
        Bits::of(elements.into_iter().map(|e| self.id(e)).collect::<Vec<_>>())
    }
}

impl Model for Set {
    type State = Bits;
    type Op = SetOp;
    fn init(&self) -> Bits {
        Bits::default()
    }
    fn step(&self, state: &Bits, op: &SetOp) -> Option<Bits> {
        match op {
            SetOp::Add(x) => {
                let mut next = state.clone();
                next.insert(*x);
                Some(next)
            }
            SetOp::Remove(x) => {
                let mut next = state.clone();
                next.remove(*x);
                Some(next)
            }
            SetOp::Read(seen) => (seen == state).then(|| state.clone()),
        }
    }
    fn unobserved(&self, op: &SetOp, history: &[Operation<SetOp>]) -> bool {
        let SetOp::Add(x) = op else { return false };
        !history.iter().any(|o| matches!(&o.op, SetOp::Read(seen) if seen.contains(*x)))
    }
}

/// The call and return events of a history, as a doubly linked list in time order.
struct Events {
    /// (operation index, is the call)
    event: Vec<(usize, bool)>,
    prev: Vec<usize>,
    next: Vec<usize>,
    /// Each operation's (call event, return event).
    of_op: Vec<(usize, usize)>,
}

const HEAD: usize = 0;

impl Events {
    fn new<Op>(history: &[Operation<Op>]) -> Events {
        // Returns before calls at equal times: an operation that ended when another began
        // precedes it. Unknown outcomes return after everything.
        let mut order: Vec<(Instant, u8, usize, bool)> = Vec::new();
        let last = history.iter().flat_map(|o| [Some(o.called), o.returned]).flatten().max();
        for (i, o) in history.iter().enumerate() {
            order.push((o.called, 1, i, true));
            let end = o.returned.or(last).expect("a history has times");
            order.push((end, if o.returned.is_some() { 0 } else { 2 }, i, false));
        }
        order.sort_by_key(|e| (e.0, e.1, e.2));
        // Index 0 is the list's head; events are 1..=n.
        let n = order.len();
        let mut event = vec![(usize::MAX, false)];
        let mut of_op = vec![(0, 0); history.len()];
        for (k, (_, _, op, call)) in order.into_iter().enumerate() {
            event.push((op, call));
            if call {
                of_op[op].0 = k + 1;
            } else {
                of_op[op].1 = k + 1;
            }
        }
        let prev = (0..=n).map(|i| i.saturating_sub(1)).collect();
        let next = (0..=n).map(|i| if i == n { usize::MAX } else { i + 1 }).collect();
        Events { event, prev, next, of_op }
    }

    fn unlink(&mut self, e: usize) {
        let (p, n) = (self.prev[e], self.next[e]);
        self.next[p] = n;
        if n != usize::MAX {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, e: usize) {
        let (p, n) = (self.prev[e], self.next[e]);
        self.next[p] = e;
        if n != usize::MAX {
            self.prev[n] = e;
        }
    }

    /// Takes an operation's call and return out of the list (it is linearised).
    fn lift(&mut self, op: usize) {
        let (call, ret) = self.of_op[op];
        self.unlink(call);
        self.unlink(ret);
    }

    fn unlift(&mut self, op: usize) {
        let (call, ret) = self.of_op[op];
        self.relink(ret);
        self.relink(call);
    }
}

/// Whether the history is linearizable under the model; the search gives up (and says so)
/// after `budget` steps rather than run for ever on a pathological history.
pub fn check<M: Model>(model: &M, history: &[Operation<M::Op>], budget: u64) -> Result<bool, String>
where
    M::Op: Clone,
{
    let kept: Vec<Operation<M::Op>> =
        history.iter().filter(|o| o.returned.is_some() || !model.unobserved(&o.op, history)).cloned().collect();
    let history = kept.as_slice();
    if history.is_empty() {
        return Ok(true);
    }
    let mut events = Events::new(history);
    let words = history.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = model.init();
    let mut entry = events.next[HEAD];
    let mut steps = 0u64;
    while events.next[HEAD] != usize::MAX {
        steps += 1;
        if steps > budget {
            return Err(format!("gave up after {budget} steps over {} operations", history.len()));
        }
        if entry == usize::MAX {
            return Ok(false);
        }
        let (op, is_call) = events.event[entry];
        if is_call {
            if let Some(next_state) = model.step(&state, &history[op].op) {
                let mut with = linearized.clone();
                with[op / 64] |= 1 << (op % 64);
                if seen.insert((with.clone(), next_state.clone())) {
                    stack.push((op, state));
                    state = next_state;
                    linearized = with;
                    events.lift(op);
                    entry = events.next[HEAD];
                    continue;
                }
            }
            entry = events.next[entry];
        } else {
            // A return whose call is not linearised: undo the last choice and try the next.
            let Some((op, before)) = stack.pop() else { return Ok(false) };
            state = before;
            linearized[op / 64] &= !(1 << (op % 64));
            events.unlift(op);
            entry = events.next[events.of_op[op].0];
        }
    }
    Ok(true)
}
