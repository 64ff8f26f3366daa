//! What a run tells its user as it goes: the loss/throughput window between
//! log lines, `metrics.jsonl` in the job's output folder (rank 0), and the
//! `latest` link next to it.

use super::TrainError;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Loss and throughput over the steps since the last log line.
#[derive(Default)]
pub(super) struct Window {
    loss: f64,
    samples: u64,
    start: Option<Instant>,
}

impl Window {
    pub(super) fn add(&mut self, mean_loss: f64, samples: u64) {
        self.start.get_or_insert_with(Instant::now);
        self.loss += mean_loss * samples as f64;
        self.samples += samples;
    }

    /// (mean loss, samples per second) of the window, then starts a new one.
    pub(super) fn take(&mut self) -> Option<(f64, f64)> {
        let start = self.start.take()?;
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        let out = (
            self.loss / self.samples.max(1) as f64,
            self.samples as f64 / secs,
        );
        self.loss = 0.0;
        self.samples = 0;
        // The next window starts now, so time between windows is counted.
        self.start = Some(Instant::now());
        Some(out)
    }
}

/// `metrics.jsonl`: one JSON object per report, appended as training goes so
/// a crash keeps what was measured.
pub(super) struct MetricsLog {
    file: std::fs::File,
    path: String,
}

impl MetricsLog {
    /// Opens the log for a run starting at `first_step`: a fresh run starts
    /// an empty file; a resumed one keeps the lines up to its checkpoint and
    /// drops later ones (they are about to be recomputed).
    pub(super) fn open(dir: &Path, first_step: u64) -> Result<Self, TrainError> {
        let path = dir.join("metrics.jsonl");
        let err = |source| TrainError::Output {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let kept: String = if first_step == 0 {
            String::new()
        } else {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= first_step)
                })
                .map(|l| format!("{l}\n"))
                .collect()
        };
        std::fs::write(&path, kept).map_err(err)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(err)?;
        Ok(MetricsLog {
            file,
            path: path.display().to_string(),
        })
    }

    pub(super) fn append(
        &mut self,
        step: u64,
        record: &BTreeMap<String, f64>,
    ) -> Result<(), TrainError> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        for (k, v) in record {
            obj.insert(k.clone(), serde_json::json!(v));
        }
        let line = serde_json::Value::Object(obj).to_string();
        writeln!(self.file, "{line}").map_err(|source| TrainError::Output {
            path: self.path.clone(),
            source,
        })
    }
}

/// Points `<output.dir>/latest` at this job's folder (a relative link,
/// replaced atomically), so a user finds the newest run without its id. A
/// failure only costs the convenience: it is logged, not fatal.
pub(super) fn link_latest(job_dir: &Path) {
    let (Some(root), Some(name)) = (job_dir.parent(), job_dir.file_name()) else {
        return;
    };
    let link = root.join(ringmaster_common::jobspec::LATEST_LINK);
    let tmp = root.join(format!(".latest.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let made = std::os::unix::fs::symlink(name, &tmp).and_then(|()| std::fs::rename(&tmp, &link));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(
            "could not point {} at {}: {e}",
            link.display(),
            job_dir.display()
        );
    }
}
