//! Files a DROP or a REPLACE took out of the catalog, removed only once every Query that was
//! running when they left it has ended. Such a Query may have planned over them (a Query is
//! begun before it is planned), and removing them under it would fail it half-way; Queries
//! begun later cannot see them. Removals wait in memory: a coordinator that stops before they
//! run leaves the files behind, where no Query of its next run can see them either.

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::config::RETIRED_REMOVALS_MAX;

type Removal = Box<dyn FnOnce() + Send>;

#[derive(Default)]
pub struct Retired {
    /// Each removal with the Queries it still waits for.
    pending: Mutex<Vec<(BTreeSet<String>, Removal)>>,
}

impl Retired {
    /// Runs `remove` once none of the Queries `running` names (asked now) runs any more: at
    /// once when none does, or when [`RETIRED_REMOVALS_MAX`] removals already wait.
    ///
    /// `running` is asked under this registry's lock: a Query that ends after it was asked
    /// reports its end ([`Retired::query_ended`]) only once the removal is listed, so no
    /// removal can wait for a Query that already ended.
    pub fn remove_after(&self, running: impl FnOnce() -> BTreeSet<String>, remove: impl FnOnce() + Send + 'static) {
        let mut pending = self.lock();
        let waits_for = running();
        // At once, the statement that asked is answered once the files are gone.
        if waits_for.is_empty() {
            drop(pending);
            return remove();
        }
        if pending.len() >= RETIRED_REMOVALS_MAX {
            drop(pending);
            tracing::warn!("{RETIRED_REMOVALS_MAX} removals of dropped files already wait for running queries: removing at once");
            return remove();
        }
        pending.push((waits_for, Box::new(remove)));
    }

    /// Query `id` ended: runs the removals that waited for it last.
    pub fn query_ended(&self, id: &str) {
        let ready: Vec<Removal> = {
            let mut pending = self.lock();
            for (waits_for, _) in pending.iter_mut() {
                waits_for.remove(id);
            }
            let (ready, waiting) = std::mem::take(&mut *pending).into_iter().partition(|(waits_for, _)| waits_for.is_empty());
            *pending = waiting;
            ready.into_iter().map(|(_, remove)| remove).collect()
        };
        run(ready);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(BTreeSet<String>, Removal)>> {
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Runs the removals that waited off the async threads when there is a runtime (they remove
/// directories, and whatever ends a Query may be polling a stream); inline otherwise.
fn run(removals: Vec<Removal>) {
    if removals.is_empty() {
        return;
    }
    let all = move || removals.into_iter().for_each(|remove| remove());
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(all)),
        Err(_) => all(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn ids(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_removal_waits_for_every_query_running_when_it_was_asked() {
        let retired = Retired::default();
        let removed = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&removed);
        retired.remove_after(|| ids(&["q1", "q2"]), move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        retired.query_ended("q3");
        retired.query_ended("q1");
        assert_eq!(removed.load(Ordering::SeqCst), 0, "q2 still runs");
        retired.query_ended("q2");
        assert_eq!(removed.load(Ordering::SeqCst), 1);
        retired.query_ended("q2");
        assert_eq!(removed.load(Ordering::SeqCst), 1, "once only");
    }

    #[test]
    fn with_nothing_running_or_too_many_waiting_files_go_at_once() {
        let retired = Retired::default();
        let removed = Arc::new(AtomicUsize::new(0));
        let count = || {
            let counter = Arc::clone(&removed);
            move || {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        };
        retired.remove_after(BTreeSet::new, count());
        assert_eq!(removed.load(Ordering::SeqCst), 1);
        for _ in 0..RETIRED_REMOVALS_MAX {
            retired.remove_after(|| ids(&["q1"]), count());
        }
        assert_eq!(removed.load(Ordering::SeqCst), 1);
        retired.remove_after(|| ids(&["q1"]), count());
        assert_eq!(removed.load(Ordering::SeqCst), 2, "past the bound, at once");
        retired.query_ended("q1");
        assert_eq!(removed.load(Ordering::SeqCst), 2 + RETIRED_REMOVALS_MAX);
    }
}
