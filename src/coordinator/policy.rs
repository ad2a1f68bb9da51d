//! Retry policy: which failures an Attempt is retried after, how long it waits first, and when a
//! Task or a Query has retried enough. The Attempt state machine ([`super::attempts`]) asks;
//! speculation and placement will sit beside these rules, not inside the state machine.

use std::time::Duration;

use super::attempts::TaskId;
use crate::config::{QUERY_RETRIES_MAX, RETRY_BACKOFF_MAX_MS, RETRY_BACKOFF_MS, TASK_ATTEMPTS_MAX};
use crate::protocol::QuiverError;

/// Whether an Attempt that failed with `error` is run again: its kind decides (a lost or
/// unreachable worker, an unreadable input, I/O, memory), never its text.
pub fn is_retryable(error: &QuiverError) -> bool {
    error.kind.is_retryable()
}

/// The pause before the next Attempt of a Task that failed `failures` times.
pub fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    Duration::from_millis((RETRY_BACKOFF_MS << shift).min(RETRY_BACKOFF_MAX_MS))
}

/// The Query's error when Task `id` has failed `failures` times: its last failure, in its own
/// words and kind, with how often it failed.
pub fn task_exhausted(failures: u32, last: Option<&QuiverError>, id: TaskId) -> Option<QuiverError> {
    (failures >= TASK_ATTEMPTS_MAX).then(|| {
        let mut error = last.cloned().unwrap_or_else(|| QuiverError::new(crate::protocol::ErrorKind::Execution, "task failed"));
        error.message = format!("{} (stage {} task {} failed {failures} attempts)", error.message, id.0, id.1);
        error.output = None;
        error
    })
}

/// The Query's error when it has started `extra` Attempts beyond its Tasks' first ones.
pub fn query_exhausted(extra: u32, last: Option<&QuiverError>) -> Option<QuiverError> {
    (extra > QUERY_RETRIES_MAX).then(|| {
        let last = last.map(|e| e.message.as_str()).unwrap_or("none");
        QuiverError::new(
            crate::protocol::ErrorKind::Execution,
            format!("the query retried more than {QUERY_RETRIES_MAX} attempts; last failure: {last}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorKind;

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        assert_eq!(backoff(1), Duration::from_millis(RETRY_BACKOFF_MS));
        assert_eq!(backoff(2), Duration::from_millis(2 * RETRY_BACKOFF_MS));
        assert_eq!(backoff(40), Duration::from_millis(RETRY_BACKOFF_MAX_MS));
    }

    #[test]
    fn an_exhausted_task_fails_with_its_own_error_and_kind() {
        let last = QuiverError::new(ErrorKind::ResourcesExhausted, "Resources exhausted: out of memory");
        assert!(task_exhausted(TASK_ATTEMPTS_MAX - 1, Some(&last), (1, 2)).is_none());
        let error = task_exhausted(TASK_ATTEMPTS_MAX, Some(&last), (1, 2)).unwrap();
        assert_eq!(error.kind, ErrorKind::ResourcesExhausted);
        assert!(error.message.starts_with("Resources exhausted: out of memory (stage 1 task 2 failed"), "{}", error.message);
    }
}
