//! Reads and checks the sample audit a job writes with `[debug]
//! audit_samples = true` (`<output.dir>/<job-id>/audit/g<gen>-r<rank>.tsv`,
//! see the worker's `trainer/audit.rs` for the format), so that recovery
//! tests can prove exactly-once training instead of inferring it from final
//! parameters that a skipped or repeated batch would barely move.
//!
//! The trajectory rule, mirrored from the writer: a step is applied in a
//! generation when some rank of it wrote `applied` for that step; its
//! samples are then the `contributes` slices of every rank of that
//! generation (a rank killed after the all-reduce completed elsewhere never
//! wrote `applied`, yet its samples were applied). When several generations
//! applied one step, the latest wins: the earlier ones were rolled back
//! when the group re-formed around an older state or a checkpoint.
//!
//! Failures are returned as text naming the sample, epoch, step, generation
//! and rank, so a failing recovery test says what went wrong rather than
//! where an assertion sat.

use anyhow::{Context, bail};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::Path;

/// The audit's folder inside a job's output folder.
pub const AUDIT_DIR: &str = "audit";

/// Most problems listed in one error: the first ones say what went wrong,
/// hundreds more only bury them.
const MAX_PROBLEMS: usize = 20;

/// What a line says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The rank handed the gradient of `ids` to the step's all-reduce.
    Contributes,
    /// The rank's optimizer step succeeded.
    Applied,
}

/// One whole line of an audit file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub generation: u64,
    pub rank: u32,
    pub world: u32,
    pub epoch: u64,
    /// 0-based global step.
    pub step: u64,
    pub event: Event,
    /// The rank's slice; empty on `applied` lines.
    pub ids: Vec<u64>,
}

/// Every whole line of a job's audit.
#[derive(Clone, Debug, Default)]
pub struct Audit {
    pub records: Vec<Record>,
    /// Files whose last line was cut short (a SIGKILL mid-write); ignored.
    pub torn_lines: usize,
}

/// What a job's audit must show.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    pub train_samples: u64,
    pub global_batch: u64,
    /// Steps the job ran: `0..steps` must each be applied once.
    pub steps: u64,
}

/// What a passing audit showed, for the test's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Generations that wrote anything.
    pub generations: usize,
    /// Epochs the steps touched (the last one possibly partial).
    pub epochs: u64,
    /// Samples applied over the whole run, rolled-back steps excluded.
    pub samples: u64,
    /// (generation, step) pairs applied and later rolled back.
    pub superseded: usize,
    /// (generation, step) pairs contributed to but applied by no rank.
    pub unapplied: usize,
    pub torn_lines: usize,
}

/// Reads every `*.tsv` under `<job_out_dir>/audit/`. An incomplete final
/// line is skipped (a SIGKILL may cut one); any other malformed line is an
/// error naming its file and line.
pub fn read_audit(job_out_dir: &Path) -> anyhow::Result<Audit> {
    let dir = job_out_dir.join(AUDIT_DIR);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("no sample audit: {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    files.sort();
    let mut audit = Audit::default();
    for path in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "tsv"))
    {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let (generation, rank) = parse_file_name(&name)
            .with_context(|| format!("{}: not a g<generation>-r<rank>.tsv name", path.display()))?;
        let whole = text.rfind('\n').map_or("", |i| &text[..=i]);
        if whole.len() < text.len() {
            audit.torn_lines += 1;
        }
        let mut mine = Vec::new();
        for (i, line) in whole.lines().enumerate() {
            if line.starts_with('#') {
                continue;
            }
            let at = || format!("{}:{}", path.display(), i + 1);
            let r = parse_line(line).with_context(|| format!("{}: {line:?}", at()))?;
            if (r.generation, r.rank) != (generation, rank) {
                bail!(
                    "{}: a record of generation {} rank {} in the file of generation \
                     {generation} rank {rank}",
                    at(),
                    r.generation,
                    r.rank
                );
            }
            mine.push(r);
        }
        check_sequence(&mine).with_context(|| path.display().to_string())?;
        audit.records.extend(mine);
    }
    Ok(audit)
}

fn parse_file_name(name: &str) -> Option<(u64, u32)> {
    let (g, r) = name.strip_suffix(".tsv")?.split_once('-')?;
    Some((
        g.strip_prefix('g')?.parse().ok()?,
        r.strip_prefix('r')?.parse().ok()?,
    ))
}

fn parse_line(line: &str) -> anyhow::Result<Record> {
    let f: Vec<&str> = line.split('\t').collect();
    if f.len() != 7 {
        bail!("expected 7 tab-separated fields, found {}", f.len());
    }
    let num = |i: usize, what: &str| -> anyhow::Result<u64> {
        f[i].parse()
            .with_context(|| format!("{what} is not a number: {:?}", f[i]))
    };
    let event = match f[5] {
        "contributes" => Event::Contributes,
        "applied" => Event::Applied,
        other => bail!("unknown event {other:?}"),
    };
    let ids = if f[6].is_empty() {
        Vec::new()
    } else {
        f[6].split(',')
            .map(|i| i.parse().with_context(|| format!("bad sample id {i:?}")))
            .collect::<anyhow::Result<_>>()?
    };
    if event == Event::Applied && !ids.is_empty() {
        bail!("an applied line carries no sample ids");
    }
    Ok(Record {
        generation: num(0, "generation")?,
        rank: u32::try_from(num(1, "rank")?)?,
        world: u32::try_from(num(2, "world")?)?,
        epoch: num(3, "epoch")?,
        step: num(4, "step")?,
        event,
        ids,
    })
}

/// One rank in one generation steps in order: `contributes s`, `applied s`,
/// `contributes s+1`, ...; a step that did not apply ends its generation.
fn check_sequence(records: &[Record]) -> anyhow::Result<()> {
    let mut pending: Option<&Record> = None;
    let mut last_applied: Option<u64> = None;
    for r in records {
        if r.world != records[0].world {
            bail!(
                "the world changes from {} to {} within one generation, at step {}",
                records[0].world,
                r.world,
                r.step
            );
        }
        match (r.event, pending) {
            (Event::Contributes, None) => {
                if let Some(prev) = last_applied
                    && r.step != prev + 1
                {
                    bail!("step {} follows step {prev}", r.step);
                }
                pending = Some(r);
            }
            (Event::Contributes, Some(p)) => bail!(
                "step {} contributed after step {} that never applied",
                r.step,
                p.step
            ),
            (Event::Applied, Some(p)) if p.step == r.step && p.epoch == r.epoch => {
                last_applied = Some(r.step);
                pending = None;
            }
            (Event::Applied, _) => bail!("step {} applied without contributing first", r.step),
        }
    }
    Ok(())
}

/// One (generation, step) as the ranks recorded it.
#[derive(Default)]
struct Attempt<'a> {
    world: u32,
    slices: BTreeMap<u32, &'a Record>,
    applied: BTreeSet<u32>,
}

impl Audit {
    /// Checks that the run applied every step of `0..expect.steps` once and
    /// every sample once per epoch (see the module docs for which records
    /// count), and that within each applied (generation, step) every rank of
    /// the world handed in a slice and the slices are disjoint and add up to
    /// the step's batch.
    pub fn check(&self, expect: &Expect) -> anyhow::Result<Summary> {
        let n = expect.train_samples;
        let b = expect.global_batch;
        if n == 0 || b == 0 {
            bail!("an audit check needs samples and a batch: {expect:?}");
        }
        let per_epoch = n.div_ceil(b);
        // Step k of an epoch consumes positions [kB, min((k+1)B, n)).
        let batch_len = |step: u64| {
            let k = step % per_epoch;
            ((k + 1) * b).min(n) - (k * b).min(n)
        };
        let mut problems = Vec::new();

        let mut attempts: BTreeMap<(u64, u64), Attempt> = BTreeMap::new();
        let mut worlds: BTreeMap<u64, u32> = BTreeMap::new();
        for r in &self.records {
            let world = *worlds.entry(r.generation).or_insert(r.world);
            if world != r.world {
                problems.push(format!(
                    "generation {}: rank {} reports a world of {}, another rank {world}",
                    r.generation, r.rank, r.world
                ));
                continue;
            }
            if r.rank >= r.world {
                problems.push(format!(
                    "generation {}: rank {} is outside its world of {}",
                    r.generation, r.rank, r.world
                ));
                continue;
            }
            if r.epoch != r.step / per_epoch {
                problems.push(format!(
                    "step {} (generation {}, rank {}) is labelled epoch {}, but with {per_epoch} \
                     steps an epoch it belongs to epoch {}",
                    r.step,
                    r.generation,
                    r.rank,
                    r.epoch,
                    r.step / per_epoch
                ));
            }
            let a = attempts.entry((r.generation, r.step)).or_default();
            a.world = world;
            match r.event {
                Event::Contributes => {
                    a.slices.insert(r.rank, r);
                }
                Event::Applied => {
                    a.applied.insert(r.rank);
                }
            }
        }

        let mut unapplied = 0;
        for (&(g, s), a) in &attempts {
            if a.applied.is_empty() {
                unapplied += 1;
                continue;
            }
            let absent: Vec<u32> = (0..a.world).filter(|r| !a.slices.contains_key(r)).collect();
            if !absent.is_empty() {
                problems.push(format!(
                    "step {s} (generation {g}) was applied by ranks {:?} but ranks {absent:?} of \
                     {} never recorded their slice",
                    a.applied, a.world
                ));
            }
            let mut owner: HashMap<u64, u32> = HashMap::new();
            let mut total = 0u64;
            for (&rank, r) in &a.slices {
                total += r.ids.len() as u64;
                for &id in &r.ids {
                    if id >= n {
                        problems.push(format!(
                            "step {s} (generation {g}, rank {rank}): sample {id} is not among \
                             the {n} training samples"
                        ));
                    }
                    if let Some(other) = owner.insert(id, rank) {
                        problems.push(format!(
                            "step {s} (generation {g}): sample {id} is in the slices of both \
                             rank {other} and rank {rank}"
                        ));
                    }
                }
            }
            if absent.is_empty() && total != batch_len(s) {
                problems.push(format!(
                    "step {s} (generation {g}): the ranks' slices hold {total} samples, the \
                     step's batch has {}",
                    batch_len(s)
                ));
            }
        }

        // The latest generation that applied a step wins.
        let mut winner: BTreeMap<u64, u64> = BTreeMap::new();
        let mut applied_pairs = 0;
        for (&(g, s), a) in &attempts {
            if !a.applied.is_empty() {
                applied_pairs += 1;
                winner.insert(s, g);
            }
        }
        let superseded = applied_pairs - winner.len();
        let missing: Vec<u64> = (0..expect.steps)
            .filter(|s| !winner.contains_key(s))
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "{} of the {} steps were never applied: {}",
                missing.len(),
                expect.steps,
                list(&missing)
            ));
        }
        let beyond: Vec<u64> = winner.range(expect.steps..).map(|(s, _)| *s).collect();
        if !beyond.is_empty() {
            problems.push(format!(
                "steps applied beyond the job's {}: {}",
                expect.steps,
                list(&beyond)
            ));
        }

        // Every sample once per epoch, over the winning slices only.
        let mut seen: BTreeMap<u64, HashMap<u64, (u64, u64, u32)>> = BTreeMap::new();
        let mut samples = 0u64;
        for (&s, &g) in winner.range(..expect.steps) {
            let epoch = s / per_epoch;
            let firsts = seen.entry(epoch).or_default();
            for (&rank, r) in &attempts[&(g, s)].slices {
                samples += r.ids.len() as u64;
                for &id in &r.ids {
                    if let Some((s0, g0, r0)) = firsts.insert(id, (s, g, rank)) {
                        problems.push(format!(
                            "epoch {epoch}: sample {id} was applied twice, at step {s0} \
                             (generation {g0}, rank {r0}) and at step {s} (generation {g}, \
                             rank {rank})"
                        ));
                    }
                }
            }
        }
        let epochs = expect.steps.div_ceil(per_epoch);
        for epoch in 0..epochs {
            let steps_in = (expect.steps - epoch * per_epoch).min(per_epoch);
            let want = (steps_in * b).min(n);
            let got = seen.get(&epoch).map_or(0, |m| m.len() as u64);
            if got == want {
                continue;
            }
            let mut line = format!(
                "epoch {epoch} ({steps_in} of {per_epoch} steps) applied {got} distinct \
                 samples, expected {want}"
            );
            if steps_in == per_epoch {
                let m = seen.get(&epoch);
                let absent: Vec<u64> = (0..n)
                    .filter(|id| m.is_none_or(|m| !m.contains_key(id)))
                    .collect();
                let _ = write!(line, "; never applied: {}", list(&absent));
            }
            problems.push(line);
        }

        if !problems.is_empty() {
            let total = problems.len();
            let mut text = format!("the sample audit found {total} problem(s):");
            for p in problems.iter().take(MAX_PROBLEMS) {
                let _ = write!(text, "\n  - {p}");
            }
            if total > MAX_PROBLEMS {
                let _ = write!(text, "\n  ... and {} more", total - MAX_PROBLEMS);
            }
            bail!(text);
        }
        Ok(Summary {
            generations: worlds.len(),
            epochs,
            samples,
            superseded,
            unapplied,
            torn_lines: self.torn_lines,
        })
    }
}

/// The first few numbers of a long list.
fn list(ids: &[u64]) -> String {
    const SHOWN: usize = 10;
    let head: Vec<String> = ids.iter().take(SHOWN).map(u64::to_string).collect();
    if ids.len() > SHOWN {
        format!("{} ... ({} in all)", head.join(", "), ids.len())
    } else {
        head.join(", ")
    }
}

/// Training samples of a dataset packed by [`crate::pack_digits`] (or any
/// `<data>/train`), from its manifest.
pub fn train_samples(data: &Path) -> u64 {
    let path = data.join("train/MANIFEST.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let manifest: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    manifest["num_samples"]
        .as_u64()
        .unwrap_or_else(|| panic!("{}: no num_samples", path.display()))
}

/// Reads and checks a finished job's audit; panics with the checker's text.
pub fn assert_exactly_once(job_out_dir: &Path, expect: &Expect) -> Summary {
    let summary = read_audit(job_out_dir).and_then(|a| a.check(expect));
    match summary {
        Ok(s) => {
            eprintln!("sample audit of {}: {s:?}", job_out_dir.display());
            s
        }
        Err(e) => panic!("{}: {e:#}", job_out_dir.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 50 samples in batches of 8: 7 steps an epoch, the last one of 2.
    const N: u64 = 50;
    const B: u64 = 8;
    const EXPECT: Expect = Expect {
        train_samples: N,
        global_batch: B,
        steps: 17,
    };

    /// A stand-in for the epoch's shuffle: a permutation (7 is prime to
    /// 50) that differs between epochs.
    fn perm(epoch: u64) -> Vec<u64> {
        (0..N).map(|i| (i * 7 + epoch * 3) % N).collect()
    }

    /// The slice of rank `rank` of `world` at global step `step`, as the
    /// shard plan cuts it.
    fn slice(step: u64, rank: u32, world: u32) -> Vec<u64> {
        let per_epoch = N.div_ceil(B);
        let (epoch, k) = (step / per_epoch, step % per_epoch);
        let (start, end) = ((k * B).min(N), ((k + 1) * B).min(N));
        let len = end - start;
        let (r, w) = (u64::from(rank), u64::from(world));
        let (lo, hi) = (start + len * r / w, start + len * (r + 1) / w);
        perm(epoch)[lo as usize..hi as usize].to_vec()
    }

    fn contributes(g: u64, rank: u32, world: u32, step: u64, ids: &[u64]) -> String {
        let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
        let epoch = step / N.div_ceil(B);
        format!(
            "{g}\t{rank}\t{world}\t{epoch}\t{step}\tcontributes\t{}\n",
            ids.join(",")
        )
    }

    fn applied(g: u64, rank: u32, world: u32, step: u64) -> String {
        let epoch = step / N.div_ceil(B);
        format!("{g}\t{rank}\t{world}\t{epoch}\t{step}\tapplied\t\n")
    }

    /// Each rank's lines of generation `g` applying `steps` cleanly.
    fn generation(g: u64, world: u32, steps: std::ops::Range<u64>) -> Vec<Vec<String>> {
        (0..world)
            .map(|rank| {
                let mut lines =
                    vec!["# generation\trank\tworld\tepoch\tstep\tevent\tsample_ids\n".into()];
                for s in steps.clone() {
                    lines.push(contributes(g, rank, world, s, &slice(s, rank, world)));
                    lines.push(applied(g, rank, world, s));
                }
                lines
            })
            .collect()
    }

    struct Job(tempfile::TempDir);

    impl Job {
        fn new() -> Job {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join(AUDIT_DIR)).unwrap();
            Job(dir)
        }

        fn write(&self, g: u64, files: &[Vec<String>]) -> &Self {
            for (rank, lines) in files.iter().enumerate() {
                let path = self
                    .0
                    .path()
                    .join(AUDIT_DIR)
                    .join(format!("g{g:06}-r{rank:04}.tsv"));
                std::fs::write(path, lines.concat()).unwrap();
            }
            self
        }

        fn check(&self) -> anyhow::Result<Summary> {
            read_audit(self.0.path())?.check(&EXPECT)
        }

        fn fails_with(&self, parts: &[&str]) {
            let err = format!("{:#}", self.check().expect_err("the audit must fail"));
            eprintln!("{err}");
            for p in parts {
                assert!(err.contains(p), "{p:?} not in: {err}");
            }
        }
    }

    #[test]
    fn a_clean_run_across_a_resize_passes_with_a_partial_last_epoch() {
        let job = Job::new();
        job.write(1, &generation(1, 2, 0..10))
            .write(2, &generation(2, 3, 10..17));
        let s = job.check().unwrap();
        assert_eq!(
            s,
            Summary {
                generations: 2,
                epochs: 3,
                // Two whole epochs, then 3 steps of 8.
                samples: 2 * N + 3 * B,
                superseded: 0,
                unapplied: 0,
                torn_lines: 0,
            }
        );
    }

    #[test]
    fn a_rolled_back_step_is_superseded_by_its_redo_and_a_torn_last_line_is_ignored() {
        let job = Job::new();
        let mut first = generation(1, 2, 0..9);
        // Step 5 of the rolled-back stretch even took the wrong samples:
        // only its redo in generation 2 may count.
        first[0][11] = contributes(1, 0, 2, 5, &slice(4, 0, 2));
        first[1].push("1\t1\t2\t1\t9\tcontri".into());
        job.write(1, &first).write(2, &generation(2, 3, 5..17));
        let s = job.check().unwrap();
        assert_eq!((s.superseded, s.torn_lines), (4, 1), "{s:?}");

        // Without the redo, the wrong samples of step 5 are caught.
        let job = Job::new();
        job.write(1, &first).write(2, &generation(2, 3, 9..17));
        job.fails_with(&[
            "epoch 0: sample",
            "applied twice",
            "at step 5 (generation 1, rank 0)",
        ]);
    }

    #[test]
    fn a_rank_killed_after_the_all_reduce_still_had_its_slice_applied() {
        let job = Job::new();
        let mut first = generation(1, 2, 0..8);
        // Rank 1 died before writing "applied" for step 7, which rank 0
        // applied; rank 0's step 8 then failed in the all-reduce.
        first[1].pop();
        first[0].push(contributes(1, 0, 2, 8, &slice(8, 0, 2)));
        job.write(1, &first).write(2, &generation(2, 2, 8..17));
        let s = job.check().unwrap();
        assert_eq!((s.superseded, s.unapplied), (0, 1), "{s:?}");
    }

    #[test]
    fn a_duplicated_sample_is_named_with_its_epoch_steps_and_ranks() {
        let job = Job::new();
        let mut second = generation(2, 3, 10..17);
        // Step 11's rank 0 takes a sample of step 10 in place of its own.
        let mut ids = slice(11, 0, 3);
        let stolen = slice(10, 2, 3)[0];
        let lost = ids[0];
        ids[0] = stolen;
        second[0][3] = contributes(2, 0, 3, 11, &ids);
        job.write(1, &generation(1, 2, 0..10)).write(2, &second);
        job.fails_with(&[
            &format!("epoch 1: sample {stolen} was applied twice"),
            "at step 10 (generation 2, rank 2) and at step 11 (generation 2, rank 0)",
            &format!("never applied: {lost}"),
        ]);
    }

    #[test]
    fn a_missing_step_or_rank_or_an_overlap_fails() {
        // Generation 2 starts one step late.
        let job = Job::new();
        job.write(1, &generation(1, 2, 0..9))
            .write(2, &generation(2, 3, 10..17));
        job.fails_with(&[
            "1 of the 17 steps were never applied: 9",
            "epoch 1 (7 of 7 steps)",
        ]);

        // Rank 1 of generation 1 left no file at all.
        let job = Job::new();
        let mut first = generation(1, 2, 0..10);
        first.pop();
        job.write(1, &first).write(2, &generation(2, 3, 10..17));
        job.fails_with(&["step 0 (generation 1) was applied by ranks {0} but ranks [1] of 2"]);

        // Rank 1's slice of step 3 repeats rank 0's.
        let job = Job::new();
        let mut first = generation(1, 2, 0..10);
        first[1][7] = contributes(1, 1, 2, 3, &slice(3, 0, 2));
        job.write(1, &first).write(2, &generation(2, 3, 10..17));
        job.fails_with(&["step 3 (generation 1): sample", "rank 0 and rank 1"]);

        // A step past the job's end.
        let job = Job::new();
        job.write(1, &generation(1, 2, 0..18));
        job.fails_with(&["steps applied beyond the job's 17: 17"]);
    }

    #[test]
    fn malformed_or_out_of_order_lines_are_errors_naming_the_file_and_line() {
        let job = Job::new();
        let mut first = generation(1, 1, 0..17);
        first[0][4] = "1\t0\t1\t0\ttwo\tapplied\t\n".into();
        job.write(1, &first);
        job.fails_with(&["g000001-r0000.tsv:5", "step is not a number"]);

        let job = Job::new();
        let mut first = generation(1, 1, 0..17);
        first[0].remove(4);
        job.write(1, &first);
        job.fails_with(&[
            "g000001-r0000.tsv",
            "step 2 contributed after step 1 that never applied",
        ]);

        let job = Job::new();
        let mut first = generation(1, 1, 0..17);
        first[0].drain(3..5);
        job.write(1, &first);
        job.fails_with(&["step 2 follows step 0"]);
    }
}
