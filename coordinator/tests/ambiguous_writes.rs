//! An ambiguous store write (sent, but no answer: it may or may not have
//! happened) is settled by reading the key back: the coordinator neither
//! loses the write nor fails the request.

use ringmaster_common::ids::JobId;
use ringmaster_common::jobspec::JobSpec;
use ringmaster_common::records::{self, JobStatusRecord};
use ringmaster_coordinator::control::{self, ControlConfig, Msg};
use ringmaster_store::{StateStore, StoreError, keys};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Whether the ambiguous write actually landed.
#[derive(Clone, Copy)]
enum Fate {
    Applied,
    Lost,
}

mod hooked_store;

use hooked_store::{Hook, Hooked};

/// The first write to a job status key gets no answer.
struct Flaky {
    fate: Fate,
    tripped: AtomicUsize,
    log: Mutex<Vec<String>>,
}

impl Hook for Flaky {
    fn intercept_put(&self, key: &str) -> Option<(bool, StoreError)> {
        self.log.lock().unwrap().push(format!("put {key}"));
        if key.ends_with("/status") && self.tripped.fetch_add(1, Ordering::SeqCst) == 0 {
            let applied = matches!(self.fate, Fate::Applied);
            return Some((
                applied,
                StoreError::Ambiguous("timed out after sending".into()),
            ));
        }
        None
    }
}

#[track_caller]
fn check(fate: Fate, expected_status_puts: usize) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = std::sync::Arc::new(Hooked::new(Flaky {
            fate,
            tripped: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
        }));
        let handle = control::start(store.clone(), "flaky".into(), ControlConfig::default())
            .await
            .unwrap();
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/digits-mlp.toml");
        let spec = JobSpec::from_toml(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
        let id = handle.call(|r| Msg::Submit(spec, None, r)).await.unwrap();
        assert_eq!(id, JobId("digits-mlp-1".into()));
        let key = keys::job_status(&id).unwrap();
        let stored = store
            .inner
            .get(&key)
            .await
            .unwrap()
            .expect("status written");
        let status: JobStatusRecord = records::decode(&key, &stored.value).unwrap();
        assert_eq!(status.state.as_str(), "queued");
        let puts = store
            .hook
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.ends_with("/status"))
            .count();
        assert_eq!(puts, expected_status_puts);
    });
}

#[test]
fn an_ambiguous_write_that_landed_is_not_repeated() {
    check(Fate::Applied, 1);
}

#[test]
fn an_ambiguous_write_that_was_lost_is_written_again() {
    check(Fate::Lost, 2);
}
