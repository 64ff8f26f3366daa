//! The sample audit (`[debug] audit_samples = true`): each rank writes down
//! which dataset samples it fed into which optimizer step, so that a test can
//! prove from the outside, after SIGKILLs, re-formed groups and resizes, that
//! every sample was applied exactly once per epoch. Parameters that merely end
//! close to an undisturbed run's cannot show that: a skipped or repeated
//! batch moves them too little to notice.
//!
//! Where: `<output.dir>/<job-id>/audit/g<generation>-r<rank>.tsv`, one file
//! per (generation, rank), created when the run is bound to that
//! generation's group. A killed worker's replacement may get the same rank
//! in a later generation, never in the same one (the coordinator persists a
//! generation before it hands it out), so no two processes ever share a
//! file; the file is created exclusively, so a broken assumption fails the
//! run instead of silently interleaving two writers.
//!
//! Format: a `#` header line, then tab-separated lines
//! `generation rank world epoch step event sample_ids`, where `step` is the
//! 0-based global step (the cursor before the step), `event` is
//! `contributes` or `applied`, and `sample_ids` are the dataset ids of the
//! rank's slice, comma-separated, on `contributes` lines only (empty on
//! `applied` lines and for a rank with no samples at that step).
//!
//! Why two events: a step is applied by the group once its gradient
//! all-reduce completes, and the all-reduce needs every rank's slice. A rank
//! killed after the others finished the all-reduce but before it could
//! write "applied" still had its samples applied by the survivors. So each
//! rank writes `contributes` (with its ids) just before it enters the
//! all-reduce, and `applied` only once its optimizer step succeeded; a step
//! that diverged or was aborted never gets `applied`. Each line is one
//! `write` on an unbuffered file: a SIGKILL leaves whole lines in the page
//! cache, at worst a torn last line, which readers must ignore.
//!
//! Reading it: when a member dies the step in flight is redone in the next
//! generation, and the survivor with the newest state becomes the source,
//! so a step applied by some rank in generation `g` may be applied again
//! in `g + 1` from an older state (and a restart from a checkpoint redoes
//! every step after it). The run's trajectory is therefore: for each step,
//! the latest generation in which some rank wrote `applied` for it wins,
//! and that step's samples are the `contributes` slices of every rank of
//! that generation; earlier generations' records of the step were rolled
//! back. Within one epoch the winning slices must then cover every sample
//! exactly once (the last epoch may be cut short by a `steps` duration).

use super::TrainError;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::Path;

/// The audit's folder inside the job's output folder.
pub const AUDIT_DIR: &str = "audit";

/// The file of rank `rank` in generation `generation`.
pub fn file_name(generation: u64, rank: u32) -> String {
    format!("g{generation:06}-r{rank:04}.tsv")
}

/// One rank's audit file for one generation.
pub(super) struct AuditLog {
    file: File,
    path: String,
    generation: u64,
    rank: u32,
    world: u32,
    /// Reused for every line: a step must not allocate per sample id.
    line: String,
}

impl AuditLog {
    /// Creates this (generation, rank)'s file under `<job_dir>/audit/`.
    pub(super) fn create(
        job_dir: &Path,
        generation: u64,
        rank: u32,
        world: u32,
    ) -> Result<AuditLog, TrainError> {
        let dir = job_dir.join(AUDIT_DIR);
        let path = dir.join(file_name(generation, rank));
        let shown = format!("the sample audit {}", path.display());
        let err = |source| TrainError::Output {
            path: shown.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(err)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    err(std::io::Error::new(
                        e.kind(),
                        format!(
                            "it already exists: generation {generation} rank {rank} was \
                             audited before"
                        ),
                    ))
                } else {
                    err(e)
                }
            })?;
        let mut log = AuditLog {
            file,
            path: shown,
            generation,
            rank,
            world,
            line: String::new(),
        };
        log.line
            .push_str("# generation\trank\tworld\tepoch\tstep\tevent\tsample_ids\n");
        log.flush_line()?;
        Ok(log)
    }

    /// This rank is about to hand the gradient of `ids` to the all-reduce
    /// of global step `step`.
    pub(super) fn contributes(
        &mut self,
        epoch: u64,
        step: u64,
        ids: &[u64],
    ) -> Result<(), TrainError> {
        self.start_line(epoch, step, "contributes");
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                self.line.push(',');
            }
            let _ = write!(self.line, "{id}");
        }
        self.line.push('\n');
        self.flush_line()
    }

    /// This rank's optimizer step for global step `step` succeeded.
    pub(super) fn applied(&mut self, epoch: u64, step: u64) -> Result<(), TrainError> {
        self.start_line(epoch, step, "applied");
        self.line.push('\n');
        self.flush_line()
    }

    fn start_line(&mut self, epoch: u64, step: u64, event: &str) {
        self.line.clear();
        // Writing into a String cannot fail.
        let _ = write!(
            self.line,
            "{}\t{}\t{}\t{epoch}\t{step}\t{event}\t",
            self.generation, self.rank, self.world
        );
    }

    /// One `write_all` per line, straight to the kernel: nothing sits in a
    /// user-space buffer for a SIGKILL to lose.
    fn flush_line(&mut self) -> Result<(), TrainError> {
        self.file
            .write_all(self.line.as_bytes())
            .map_err(|source| TrainError::Output {
                path: self.path.clone(),
                source,
            })
    }
}
