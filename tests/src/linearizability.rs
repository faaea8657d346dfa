//! A linearizability checker for histories of one register with
//! compare-and-set, in the style of Knossos and Porcupine: Wing & Gong's
//! search with Lowe's memoization (WGL).
//!
//! A history is the operations concurrent clients ran, each with the real
//! times it was invoked and answered. An operation whose answer never came
//! (a timeout, a lost connection) is *indeterminate*: it may have taken
//! effect at any time after its invocation, or never, so it is given an
//! answer at the end of time and its outcome is left open. The history is
//! linearizable when some order of the operations, each placed between its
//! invocation and its answer, is a legal sequence of the register.
//!
//! Histories of independent registers are checked one by one (Herlihy &
//! Wing's locality), which keeps each search small.

use std::collections::HashSet;
use std::fmt;

/// What an operation asked the register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write(u64),
    /// Set `to` if the register holds `from`.
    Cas {
        from: u64,
        to: u64,
    },
}

/// What it answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A read saw this value (`None`: never written).
    Read(Option<u64>),
    /// A write or compare-and-set was applied.
    Applied,
    /// A compare-and-set was refused: the register held another value.
    Refused,
    /// No answer: it may or may not have taken effect.
    Unknown,
}

/// One operation of a history, with its times in nanoseconds from any one
/// origin shared by the whole history.
#[derive(Clone, Debug)]
pub struct Entry {
    pub client: usize,
    pub op: Op,
    pub invoked_ns: u64,
    /// `None` for an indeterminate operation.
    pub answered_ns: Option<u64>,
    pub outcome: Outcome,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let answered = match self.answered_ns {
            Some(t) => format!("{:.3} ms", t as f64 / 1e6),
            None => "never".to_string(),
        };
        write!(
            f,
            "client {} {:?} -> {:?} (invoked {:.3} ms, answered {answered})",
            self.client,
            self.op,
            self.outcome,
            self.invoked_ns as f64 / 1e6
        )
    }
}

/// Why a history is not linearizable: the longest legal prefix the search
/// found and the operations none of whose placements could extend it.
#[derive(Debug)]
pub struct Violation {
    pub linearized: Vec<Entry>,
    pub stuck_at: Vec<Entry>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "not linearizable: {} operations could be ordered, then none of these fits:",
            self.linearized.len()
        )?;
        for e in &self.stuck_at {
            writeln!(f, "  {e}")?;
        }
        writeln!(f, "the last ordered operations were:")?;
        let from = self.linearized.len().saturating_sub(8);
        for e in &self.linearized[from..] {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// The register's answer to `op` in `state`: the new state when the
/// recorded `outcome` is possible there.
fn step(state: Option<u64>, op: Op, outcome: Outcome) -> Option<Option<u64>> {
    match (op, outcome) {
        (Op::Read, Outcome::Read(seen)) => (seen == state).then_some(state),
        (Op::Read, Outcome::Unknown) => Some(state),
        (Op::Write(v), Outcome::Applied | Outcome::Unknown) => Some(Some(v)),
        (Op::Cas { from, to }, Outcome::Applied) => (state == Some(from)).then_some(Some(to)),
        (Op::Cas { from, .. }, Outcome::Refused) => (state != Some(from)).then_some(state),
        // Either it found `from` and set `to`, or it found another value
        // and changed nothing.
        (Op::Cas { from, to }, Outcome::Unknown) => {
            Some(if state == Some(from) { Some(to) } else { state })
        }
        _ => None,
    }
}

/// One call or return event in the doubly linked list the search lifts
/// operations out of.
#[derive(Clone, Copy)]
struct Node {
    op: usize,
    is_call: bool,
    /// For a call, the index of its return node.
    matching: usize,
    prev: usize,
    next: usize,
}

const NIL: usize = usize::MAX;

/// Checks one register's history, starting from `initial`. Operations that
/// did nothing observable (a failed read) should be left out by the
/// caller; an indeterminate read is ignored here.
pub fn check(initial: Option<u64>, history: &[Entry]) -> Result<(), Violation> {
    let ops: Vec<&Entry> = history
        .iter()
        .filter(|e| !(e.op == Op::Read && e.outcome == Outcome::Unknown))
        .collect();
    let n = ops.len();
    if n == 0 {
        return Ok(());
    }
    // Events in time order: calls before returns at the same instant (so
    // touching operations count as concurrent, the lenient reading).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, e) in ops.iter().enumerate() {
        events.push((e.invoked_ns, true, i));
        events.push((e.answered_ns.unwrap_or(u64::MAX), false, i));
    }
    events.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
    // Node 0 is the list head; events follow from 1.
    let mut nodes = vec![
        Node {
            op: NIL,
            is_call: false,
            matching: NIL,
            prev: NIL,
            next: NIL,
        };
        2 * n + 1
    ];
    let mut return_of = vec![NIL; n];
    for (k, &(_, is_call, op)) in events.iter().enumerate() {
        let id = k + 1;
        nodes[id].op = op;
        nodes[id].is_call = is_call;
        nodes[id].prev = k;
        nodes[k].next = id;
        if !is_call {
            return_of[op] = id;
        }
    }
    for id in 1..nodes.len() {
        if nodes[id].is_call {
            nodes[id].matching = return_of[nodes[id].op];
        }
    }
    let lift = |nodes: &mut Vec<Node>, call: usize| {
        for id in [call, nodes[call].matching] {
            let (p, nx) = (nodes[id].prev, nodes[id].next);
            nodes[p].next = nx;
            if nx != NIL {
                nodes[nx].prev = p;
            }
        }
    };
    let unlift = |nodes: &mut Vec<Node>, call: usize| {
        for id in [nodes[call].matching, call] {
            let (p, nx) = (nodes[id].prev, nodes[id].next);
            nodes[p].next = id;
            if nx != NIL {
                nodes[nx].prev = id;
            }
        }
    };

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new();
    let mut best: Vec<usize> = Vec::new();
    let mut state = initial;
    let mut entry = nodes[0].next;
    while nodes[0].next != NIL {
        if entry == NIL {
            // Only possible after every remaining call was tried; treat as
            // reaching a return.
            break;
        }
        let node = nodes[entry];
        if node.is_call {
            let e = ops[node.op];
            if let Some(next_state) = step(state, e.op, e.outcome) {
                let mut with = linearized.clone();
                with[node.op / 64] |= 1 << (node.op % 64);
                if cache.insert((with.clone(), next_state)) {
                    stack.push((entry, state));
                    state = next_state;
                    linearized = with;
                    lift(&mut nodes, entry);
                    if stack.len() > best.len() {
                        best = stack.iter().map(|&(c, _)| nodes[c].op).collect();
                    }
                    entry = nodes[0].next;
                    continue;
                }
            }
            entry = node.next;
        } else {
            // A return whose call could not be placed: undo the last choice.
            let Some((call, previous)) = stack.pop() else {
                return Err(violation(&ops, &best, &nodes));
            };
            unlift(&mut nodes, call);
            let op = nodes[call].op;
            linearized[op / 64] &= !(1 << (op % 64));
            state = previous;
            entry = nodes[call].next;
        }
    }
    if nodes[0].next != NIL {
        return Err(violation(&ops, &best, &nodes));
    }
    Ok(())
}

fn violation(ops: &[&Entry], best: &[usize], nodes: &[Node]) -> Violation {
    let done: HashSet<usize> = best.iter().copied().collect();
    // The operations that must come next: those whose calls precede the
    // first pending return in the best prefix's remaining history.
    let mut stuck = Vec::new();
    let mut id = 1;
    while id < nodes.len() {
        let node = nodes[id];
        if !done.contains(&node.op) {
            if node.is_call {
                stuck.push(ops[node.op].clone());
            } else {
                break;
            }
        }
        id += 1;
    }
    Violation {
        linearized: best.iter().map(|&i| ops[i].clone()).collect(),
        stuck_at: stuck,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(client: usize, op: Op, from: u64, to: Option<u64>, outcome: Outcome) -> Entry {
        Entry {
            client,
            op,
            invoked_ns: from,
            answered_ns: to,
            outcome,
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            e(0, Op::Write(1), 0, Some(10), Outcome::Applied),
            e(0, Op::Read, 20, Some(30), Outcome::Read(Some(1))),
            e(
                1,
                Op::Cas { from: 1, to: 2 },
                40,
                Some(50),
                Outcome::Applied,
            ),
            e(
                1,
                Op::Cas { from: 1, to: 3 },
                60,
                Some(70),
                Outcome::Refused,
            ),
            e(0, Op::Read, 80, Some(90), Outcome::Read(Some(2))),
        ];
        check(None, &h).unwrap();
    }

    #[test]
    fn a_stale_read_after_an_acknowledged_write_is_caught() {
        let h = [
            e(0, Op::Write(1), 0, Some(10), Outcome::Applied),
            e(0, Op::Write(2), 20, Some(30), Outcome::Applied),
            e(1, Op::Read, 40, Some(50), Outcome::Read(Some(1))),
        ];
        let v = check(None, &h).unwrap_err();
        assert!(v.to_string().contains("Read(Some(1))"), "{v}");
    }

    #[test]
    fn concurrent_operations_may_take_either_order() {
        // The read overlaps both writes, so it may see either.
        let h = [
            e(0, Op::Write(1), 0, Some(100), Outcome::Applied),
            e(1, Op::Write(2), 10, Some(90), Outcome::Applied),
            e(2, Op::Read, 5, Some(95), Outcome::Read(Some(1))),
            e(2, Op::Read, 110, Some(120), Outcome::Read(Some(1))),
        ];
        check(None, &h).unwrap();
        // But two later reads cannot disagree.
        let mut bad = h.to_vec();
        bad.push(e(3, Op::Read, 130, Some(140), Outcome::Read(Some(2))));
        assert!(check(None, &bad).is_err());
    }

    #[test]
    fn an_indeterminate_write_may_land_late_or_never() {
        let lost = e(0, Op::Write(7), 0, None, Outcome::Unknown);
        let never = [
            lost.clone(),
            e(1, Op::Read, 50, Some(60), Outcome::Read(None)),
        ];
        check(None, &never).unwrap();
        let late = [
            lost.clone(),
            e(1, Op::Read, 50, Some(60), Outcome::Read(None)),
            e(1, Op::Read, 500, Some(600), Outcome::Read(Some(7))),
        ];
        check(None, &late).unwrap();
        // It cannot take effect before it was invoked.
        let early = [
            e(1, Op::Read, 0, Some(5), Outcome::Read(Some(7))),
            e(0, Op::Write(7), 10, None, Outcome::Unknown),
        ];
        assert!(check(None, &early).is_err());
    }

    #[test]
    fn an_acknowledged_write_cannot_be_lost() {
        let h = [
            e(0, Op::Write(1), 0, Some(10), Outcome::Applied),
            e(1, Op::Write(2), 20, None, Outcome::Unknown),
            e(0, Op::Read, 30, Some(40), Outcome::Read(Some(2))),
            e(0, Op::Read, 50, Some(60), Outcome::Read(Some(1))),
        ];
        assert!(check(None, &h).is_err());
    }

    #[test]
    fn a_refused_compare_and_set_is_an_observation() {
        // Refused means the value was not 1 at some point inside the call;
        // with nothing concurrent and the value 1 throughout, it is a lie.
        let h = [
            e(0, Op::Write(1), 0, Some(10), Outcome::Applied),
            e(
                1,
                Op::Cas { from: 1, to: 2 },
                20,
                Some(30),
                Outcome::Refused,
            ),
        ];
        assert!(check(None, &h).is_err());
        // An indeterminate one may have applied or not.
        let h = [
            e(0, Op::Write(1), 0, Some(10), Outcome::Applied),
            e(1, Op::Cas { from: 1, to: 2 }, 20, None, Outcome::Unknown),
            e(0, Op::Read, 40, Some(50), Outcome::Read(Some(2))),
            e(
                0,
                Op::Cas { from: 2, to: 3 },
                60,
                Some(70),
                Outcome::Applied,
            ),
        ];
        check(None, &h).unwrap();
    }

    #[test]
    fn a_write_applied_twice_is_caught() {
        // A retried write landing again after another write: the register
        // goes 1, 2, 1, which no single placement of write(1) explains.
        let h = [
            e(0, Op::Write(1), 0, Some(100), Outcome::Applied),
            e(1, Op::Write(2), 10, Some(20), Outcome::Applied),
            e(2, Op::Read, 30, Some(40), Outcome::Read(Some(2))),
            e(2, Op::Read, 50, Some(60), Outcome::Read(Some(1))),
            e(2, Op::Read, 110, Some(120), Outcome::Read(Some(2))),
        ];
        assert!(check(None, &h).is_err());
    }

    #[test]
    fn many_concurrent_clients_check_quickly() {
        // 8 clients, 400 operations of a linearizable (sequentially built) history
        // with overlapping intervals: the memoized search stays small.
        let mut h = Vec::new();
        let mut value = Some(0);
        let mut t = 0u64;
        let mut seed = 7u64;
        for i in 0..400u64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let client = (seed % 8) as usize;
            let (op, outcome) = match seed % 3 {
                0 => (Op::Read, Outcome::Read(value)),
                1 => {
                    value = Some(i);
                    (Op::Write(i), Outcome::Applied)
                }
                _ => {
                    let from = value.expect("set from the start");
                    value = Some(i);
                    (Op::Cas { from, to: i }, Outcome::Applied)
                }
            };
            // Each op takes effect at t; its interval spreads around it.
            let spread = seed % 40;
            h.push(e(
                client,
                op,
                t.saturating_sub(spread),
                Some(t + spread),
                outcome,
            ));
            t += 10;
        }
        check(Some(0), &h).unwrap();
        // One read moved to a value it cannot have seen breaks it.
        let k = h.iter().rposition(|x| x.op == Op::Read).expect("reads");
        h[k].outcome = Outcome::Read(Some(100_000));
        assert!(check(Some(0), &h).is_err());
    }
}
