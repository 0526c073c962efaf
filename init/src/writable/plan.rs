//! The rotation of writable-layer generations as a plan over slots and marks, with no
//! file system in it, so every crash point can be checked as a model (tests below).
//! `docs/rotation.md` gives the argument in prose.
//!
//! A layer's top directory carries a mark (see [`Mark`]). Only marked layers are ever
//! exchanged, renamed or deleted; generations order them, not their names, so a boot cut
//! between any two steps leaves a state the next boot can finish.

use std::collections::BTreeMap;

/// The largest generation or slot number read from disk. A layer is made once a boot, so
/// no machine comes near it; a larger number was not written by layerboot, and one more
/// than the largest read (the next generation, a free slot) can never overflow.
pub const MAX_NUMBER: u64 = u32::MAX as u64;

/// What layerboot wrote on a layer it made (`trusted.layerboot.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Made, not yet filled and synced: never booted, safe to discard.
    Making,
    /// Filled and synced; generation N (higher is newer).
    Complete(u64),
    /// A `layerboot.mode=keep` boot is copying the top layer into this complete layer:
    /// the next boot that keeps it copies the top layer again.
    Refreshing(u64),
}

impl Mark {
    pub fn generation(self) -> Option<u64> {
        match self {
            Mark::Making => None,
            Mark::Complete(g) | Mark::Refreshing(g) => Some(g),
        }
    }

    pub fn encode(self) -> String {
        match self {
            Mark::Making => "making".to_string(),
            Mark::Complete(g) => format!("complete {g}"),
            Mark::Refreshing(g) => format!("refreshing {g}"),
        }
    }

    pub fn decode(raw: &[u8]) -> Option<Mark> {
        let text = std::str::from_utf8(raw).ok()?;
        match text.split_once(' ') {
            None if text == "making" => Some(Mark::Making),
            Some(("complete", g)) => number(g).map(Mark::Complete),
            Some(("refreshing", g)) => number(g).map(Mark::Refreshing),
            _ => None,
        }
    }
}

/// A generation or slot number as layerboot writes it: decimal digits, at most [`MAX_NUMBER`].
fn number(s: &str) -> Option<u64> {
    s.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| s.parse::<u64>().ok())
        .flatten()
        .filter(|&n| n <= MAX_NUMBER)
}

/// Where a generation lives at the partition's top level, for layer name NAME.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    /// `NAME`: the layer that boots.
    Current,
    /// `NAME.new`: being made, or the one an exchange displaced.
    New,
    /// `NAME.prev` (1), `NAME.prev.K`: kept earlier generations.
    Prev(usize),
    /// `NAME.trash.K`: a generation whose deletion failed, deleted again each boot.
    Trash(usize),
}

impl Slot {
    pub fn file_name(self, name: &str) -> String {
        match self {
            Slot::Current => name.to_string(),
            Slot::New => format!("{name}.new"),
            Slot::Prev(1) => format!("{name}.prev"),
            Slot::Prev(k) => format!("{name}.prev.{k}"),
            Slot::Trash(k) => format!("{name}.trash.{k}"),
        }
    }

    /// The slot `file` is for layer name `name`, if any.
    pub fn parse(name: &str, file: &str) -> Option<Slot> {
        if file == name {
            return Some(Slot::Current);
        }
        let rest = file.strip_prefix(name)?.strip_prefix('.')?;
        let number = |s: &str| number(s).filter(|&k| k >= 1 && !s.starts_with('0')).map(|k| k as usize);
        match rest.split_once('.') {
            None if rest == "new" => Some(Slot::New),
            None if rest == "prev" => Some(Slot::Prev(1)),
            Some(("prev", k)) => number(k).filter(|&k| k >= 2).map(Slot::Prev),
            Some(("trash", k)) => number(k).map(Slot::Trash),
            _ => None,
        }
    }
}

/// The layer name and slot of `file` if it names a kept generation (`X.prev`, `X.prev.K`
/// or `X.trash.K`) of some layer name X.
pub fn kept_generation(file: &str) -> Option<(&str, Slot)> {
    let numbered = file
        .rsplit_once('.')
        .and_then(|(head, _)| head.strip_suffix(".prev").or_else(|| head.strip_suffix(".trash")));
    [file.strip_suffix(".prev"), numbered]
        .into_iter()
        .flatten()
        .filter(|base| !base.is_empty())
        .find_map(|base| match Slot::parse(base, file) {
            Some(slot @ (Slot::Prev(_) | Slot::Trash(_))) => Some((base, slot)),
            _ => None,
        })
}

/// The marked layers of one name.
pub type State = BTreeMap<Slot, Mark>;

/// The empty directories an overlay layer holds when it is made: its upper and work dirs.
pub const LAYER_DIRS: [&str; 2] = ["upper", "work"];

/// One step of making a new layer `NAME.new`, before it is filled. [`make_steps`] gives
/// their order; the executor (`Layers::make_fresh`) runs exactly those, and the model
/// below cuts between any two of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MakeStep {
    /// The layer's top directory: a btrfs snapshot of the image, or an empty directory.
    Top,
    /// The `making` mark on it (and the image it is made from).
    Mark,
    /// An empty directory inside it (one of [`LAYER_DIRS`]).
    Dir(&'static str),
}

/// How a new layer is made: a snapshot is whole at once; an overlay layer's directory is
/// marked before anything is made in it, so a cut leaves either an unmarked empty
/// directory or a marked one, whatever it holds.
pub fn make_steps(snapshot: bool) -> Vec<MakeStep> {
    let mut steps = vec![MakeStep::Top, MakeStep::Mark];
    if !snapshot {
        steps.extend(LAYER_DIRS.iter().map(|&d| MakeStep::Dir(d)));
    }
    steps
}

/// Whether an unmarked `NAME.new` whose entries are the empty directories `dirs` is what
/// a boot cut before its mark left: any of [`LAYER_DIRS`], each once, or none. (Since
/// the mark comes first, only none; the others are what a boot of layerboot before that
/// order could leave, between its mkdirs.)
pub fn unmarked_leftover(dirs: &[&str]) -> bool {
    dirs.iter().all(|d| LAYER_DIRS.contains(d)) && dirs.iter().enumerate().all(|(i, d)| !dirs[..i].contains(d))
}

/// One file-system operation of a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Remove(Slot),
    /// Rename, never replacing what is at the target.
    Rename(Slot, Slot),
    /// Atomically swap the two (`renameat2(RENAME_EXCHANGE)`).
    Exchange(Slot, Slot),
}

/// What a step does to the state, as the file system does it.
pub fn apply(state: &mut State, step: Step) {
    match step {
        Step::Remove(s) => {
            state.remove(&s);
        }
        Step::Rename(a, b) => {
            if let Some(m) = state.remove(&a) {
                state.insert(b, m);
            }
        }
        Step::Exchange(a, b) => {
            let (ma, mb) = (state.remove(&a), state.remove(&b));
            if let Some(m) = ma {
                state.insert(b, m);
            }
            if let Some(m) = mb {
                state.insert(a, m);
            }
        }
    }
}

/// The generation a new layer gets: newer than every layer on disk.
pub fn next_generation(state: &State) -> u64 {
    state.values().filter_map(|m| m.generation()).max().map_or(1, |g| g + 1)
}

/// Whether `NAME.new` holds the layer an exchange displaced (complete, older than `NAME`)
/// rather than one that never booted.
pub fn displaced(state: &State) -> bool {
    let gen = |s| state.get(&s).and_then(|m: &Mark| m.generation());
    matches!((gen(Slot::New), gen(Slot::Current)), (Some(n), Some(c)) if n < c)
}

/// First thing each boot: deletes failed deletions again, discards a `NAME.new` that never
/// booted (half-made, or complete but cut before its swap), and puts one that an exchange
/// displaced where the interrupted rotation would have put it.
pub fn recover(state: &State, keep: usize) -> Vec<Step> {
    let mut steps: Vec<Step> = state
        .keys()
        .filter(|s| matches!(s, Slot::Trash(_)))
        .map(|&s| Step::Remove(s))
        .collect();
    if state.contains_key(&Slot::New) {
        if displaced(state) {
            let mut after = state.clone();
            steps.iter().for_each(|&s| apply(&mut after, s));
            steps.extend(settle(&after, keep));
        } else {
            steps.push(Step::Remove(Slot::New));
        }
    }
    steps
}

/// After the complete `NAME.new` is synced: it becomes `NAME` (one atomic exchange when
/// there is an old one), then [`settle`].
pub fn install(state: &State, keep: usize) -> Vec<Step> {
    let first = if state.contains_key(&Slot::Current) {
        Step::Exchange(Slot::New, Slot::Current)
    } else {
        Step::Rename(Slot::New, Slot::Current)
    };
    let mut after = state.clone();
    apply(&mut after, first);
    let mut steps = vec![first];
    steps.extend(settle(&after, keep));
    steps
}

/// Puts a displaced `NAME.new` first among the kept generations and deletes those beyond
/// `keep`, oldest first, before anything moves. `NAME` is never touched.
pub fn settle(state: &State, keep: usize) -> Vec<Step> {
    let mut s = state.clone();
    let mut steps = Vec::new();
    let mut push = |s: &mut State, step: Step| {
        apply(s, step);
        steps.push(step);
    };
    let has_new = s.contains_key(&Slot::New);
    // Newest first; a generation-less (half-made) one counts as oldest.
    let mut prevs: Vec<(Slot, Option<u64>)> = s
        .iter()
        .filter(|(k, _)| matches!(k, Slot::Prev(_)))
        .map(|(&k, m)| (k, m.generation()))
        .collect();
    prevs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let room = if has_new { keep.saturating_sub(1) } else { keep };
    for &(slot, _) in prevs.iter().skip(room).rev() {
        push(&mut s, Step::Remove(slot));
    }
    let first = if has_new { 2 } else { 1 };
    let mut moves: Vec<(Slot, Slot)> = prevs
        .iter()
        .take(room)
        .enumerate()
        .map(|(i, &(slot, _))| (slot, Slot::Prev(first + i)))
        .filter(|(a, b)| a != b)
        .collect();
    while !moves.is_empty() {
        match moves.iter().position(|(_, to)| !s.contains_key(to)) {
            Some(i) => {
                let (from, to) = moves.remove(i);
                push(&mut s, Step::Rename(from, to));
            }
            None => {
                // Every target is taken by another that must move: park one past the end.
                let free = s
                    .keys()
                    .filter_map(|k| if let Slot::Prev(k) = k { Some(*k) } else { None })
                    .max()
                    .unwrap_or(0)
                    + 1;
                let from = moves[0].0;
                push(&mut s, Step::Rename(from, Slot::Prev(free)));
                moves[0].0 = Slot::Prev(free);
            }
        }
    }
    if has_new {
        push(
            &mut s,
            if keep == 0 {
                Step::Remove(Slot::New)
            } else {
                Step::Rename(Slot::New, Slot::Prev(1))
            },
        );
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn slot_names_round_trip_and_nothing_else_matches() {
        for slot in [
            Slot::Current,
            Slot::New,
            Slot::Prev(1),
            Slot::Prev(2),
            Slot::Prev(12),
            Slot::Trash(3),
        ] {
            assert_eq!(Slot::parse("rw", &slot.file_name("rw")), Some(slot));
        }
        for other in [
            "rw.prev.1",
            "rw.prev.0",
            "rw.prev.02",
            "rw.new.x",
            "rw.pre-layerboot",
            "rwx",
            "rw.",
            "rw.trash.0",
            "x.rw",
        ] {
            assert_eq!(Slot::parse("rw", other), None, "{other}");
        }
        for m in [Mark::Making, Mark::Complete(7), Mark::Refreshing(9)] {
            assert_eq!(Mark::decode(m.encode().as_bytes()), Some(m));
        }
        assert_eq!(Mark::decode(b"complete x"), None);
        // Not written by layerboot: one more than these would overflow, and order wrongly.
        for raw in [
            "complete 18446744073709551615",
            "refreshing 4294967296",
            "complete +1",
            "complete ",
        ] {
            assert_eq!(Mark::decode(raw.as_bytes()), None, "{raw}");
        }
        assert_eq!(Mark::decode(b"complete 4294967295"), Some(Mark::Complete(MAX_NUMBER)));
        for other in ["rw.prev.18446744073709551615", "rw.trash.4294967296", "rw.prev.+2"] {
            assert_eq!(Slot::parse("rw", other), None, "{other}");
        }
        assert_eq!(kept_generation("a.b.prev"), Some(("a.b", Slot::Prev(1))));
        assert_eq!(kept_generation("rw-1.prev.3"), Some(("rw-1", Slot::Prev(3))));
        assert_eq!(kept_generation("rw.trash.2"), Some(("rw", Slot::Trash(2))));
        for other in [
            "rw",
            "rw.new",
            "rw.prev.1",
            "rw.trash",
            ".prev",
            "rw.prev.x",
            "rw.pre-layerboot",
        ] {
            assert_eq!(kept_generation(other), None, "{other}");
        }
        let state = State::from([(Slot::Prev(1), Mark::Complete(MAX_NUMBER))]);
        assert_eq!(next_generation(&state), MAX_NUMBER + 1);
    }

    /// One boot in the model, as the executor runs it, cut after `cut` steps if given.
    /// Returns whether it finished. `fresh` false: a `mode=keep` boot of the current layer.
    ///
    /// `unmarked` is an unmarked `NAME.new` on the disk, by the empty directories it holds:
    /// what a cut before [`MakeStep::Mark`] leaves. `Err` if the next boot would stop at it.
    fn boot(
        state: &mut State,
        unmarked: &mut Option<Vec<&'static str>>,
        snapshot: bool,
        keep: usize,
        fresh: bool,
        cut: Option<usize>,
        installed: &mut Vec<u64>,
    ) -> Result<bool, String> {
        let mut done = 0;
        let mut step = |state: &mut State, f: &mut dyn FnMut(&mut State)| -> bool {
            if cut == Some(done) {
                return false;
            }
            f(state);
            done += 1;
            true
        };
        // Layers::open: an unmarked NAME.new is marked `making` if a cut boot left it,
        // and stops the boot otherwise (it may be someone's).
        if let Some(dirs) = unmarked.clone() {
            if !unmarked_leftover(&dirs) {
                return Err(format!("the boot stops at an unmarked NAME.new holding {dirs:?}"));
            }
            if !step(state, &mut |st| {
                st.insert(Slot::New, Mark::Making);
            }) {
                return Ok(false);
            }
            *unmarked = None;
        }
        for s in recover(state, keep) {
            if !step(state, &mut |st| apply(st, s)) {
                return Ok(false);
            }
        }
        if !fresh {
            if let Some(Mark::Complete(g) | Mark::Refreshing(g)) = state.get(&Slot::Current).copied() {
                return Ok(step(state, &mut |st| {
                    st.insert(Slot::Current, Mark::Refreshing(g));
                }) && step(state, &mut |st| {
                    st.insert(Slot::Current, Mark::Complete(g));
                }));
            }
        }
        let gen = next_generation(state);
        // Making NAME.new: what is on the disk after each step, marked or not.
        let (mut top, mut marked, mut dirs) = (false, false, Vec::new());
        for m in make_steps(snapshot) {
            if !step(state, &mut |st| match m {
                MakeStep::Top => top = true,
                MakeStep::Dir(d) => dirs.push(d),
                MakeStep::Mark => {
                    st.insert(Slot::New, Mark::Making);
                    marked = true;
                }
            }) {
                if top && !marked {
                    *unmarked = Some(dirs);
                }
                return Ok(false);
            }
        }
        if !step(state, &mut |st| {
            st.insert(Slot::New, Mark::Complete(gen));
        }) {
            return Ok(false);
        }
        for (i, s) in install(state, keep).into_iter().enumerate() {
            if !step(state, &mut |st| apply(st, s)) {
                return Ok(false);
            }
            if i == 0 {
                installed.push(gen);
            }
        }
        Ok(true)
    }

    fn gens(state: &State, f: impl Fn(&Slot) -> bool) -> Vec<u64> {
        let mut v: Vec<u64> = state
            .iter()
            .filter(|(k, _)| f(k))
            .filter_map(|(_, m)| m.generation())
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Any sequence of boots, each maybe cut after any step (making `NAME.new` before
        /// its mark included), each keep N: no boot stops at what a cut left, after every
        /// cut NAME is a complete layer, the newest layer ever swapped in still exists
        /// (keep ≥ 1), and after every finished boot the kept ones are the `keep` newest
        /// that were ever swapped in, in order, with nothing half-made left.
        #[test]
        fn every_crash_point_keeps_the_newest_booted_layer(
            snapshot in any::<bool>(),
            boots in proptest::collection::vec((0usize..4, any::<bool>(), proptest::option::of(0usize..14)), 1..12)
        ) {
            let mut state = State::new();
            let mut unmarked = None;
            let mut installed: Vec<u64> = Vec::new();
            for (keep, fresh, cut) in boots {
                let before_newest = installed.last().copied();
                // Generations on disk that were swapped in at some point: what may be kept.
                let alive: Vec<u64> = gens(&state, |_| true).into_iter().filter(|g| installed.contains(g)).collect();
                let generations_before = installed.len();
                let finished = boot(&mut state, &mut unmarked, snapshot, keep, fresh, cut, &mut installed);
                prop_assert!(finished.is_ok(), "{}: {state:?}", finished.unwrap_err());
                let finished = finished.unwrap();
                if let Some(newest) = before_newest {
                    let cur = state.get(&Slot::Current).copied();
                    prop_assert!(matches!(cur, Some(Mark::Complete(_)) | Some(Mark::Refreshing(_))), "NAME is {cur:?} in {state:?}");
                    if keep >= 1 {
                        prop_assert!(state.values().any(|m| m.generation() == Some(newest)), "lost generation {newest}: {state:?}");
                    }
                }
                if finished {
                    prop_assert!(!state.contains_key(&Slot::New), "{state:?}");
                }
                if finished && installed.len() > generations_before {
                    // A fresh layer went in: the kept ones are the newest `keep` of the others.
                    let mut want = alive.clone();
                    want.truncate(keep);
                    prop_assert_eq!(gens(&state, |k| matches!(k, Slot::Prev(_))), want.clone(), "{:?}", state);
                    for (i, g) in want.iter().enumerate() {
                        prop_assert_eq!(state.get(&Slot::Prev(i + 1)).and_then(|m| m.generation()), Some(*g), "{:?}", state);
                    }
                }
            }
        }
    }

    #[test]
    fn a_cut_between_the_exchange_and_the_rename_is_finished_not_discarded() {
        let mut state = State::from([
            (Slot::Current, Mark::Complete(5)),
            (Slot::New, Mark::Complete(4)),
            (Slot::Prev(1), Mark::Complete(3)),
        ]);
        let steps = recover(&state, 2);
        assert_eq!(
            steps,
            vec![
                Step::Rename(Slot::Prev(1), Slot::Prev(2)),
                Step::Rename(Slot::New, Slot::Prev(1))
            ]
        );
        steps.into_iter().for_each(|s| apply(&mut state, s));
        assert_eq!(
            state,
            State::from([
                (Slot::Current, Mark::Complete(5)),
                (Slot::Prev(1), Mark::Complete(4)),
                (Slot::Prev(2), Mark::Complete(3))
            ])
        );
        // Unmarked, what a cut left before the mark: an empty directory (snapshot: the
        // image's) or, from a layerboot that made upper/ and work/ first, any of them.
        for dirs in [&[][..], &["upper"], &["work"], &["work", "upper"]] {
            assert!(unmarked_leftover(dirs), "{dirs:?}");
        }
        for dirs in [&["upper", "upper"][..], &["upper", "mine"], &["home"]] {
            assert!(!unmarked_leftover(dirs), "{dirs:?}");
        }
        assert_eq!(make_steps(true), [MakeStep::Top, MakeStep::Mark]);
        assert_eq!(
            make_steps(false)[..2],
            [MakeStep::Top, MakeStep::Mark],
            "marked before it holds anything"
        );
        // A half-made one, or a complete one that was never swapped in, is discarded.
        for m in [Mark::Making, Mark::Complete(6)] {
            let state = State::from([(Slot::Current, Mark::Complete(5)), (Slot::New, m)]);
            assert_eq!(recover(&state, 2), vec![Step::Remove(Slot::New)]);
        }
    }
}
