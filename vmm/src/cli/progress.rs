//! Following a VMM's job to its end: a progress bar on a terminal, a line
//! a second otherwise.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::api_client::{Client, ClientError};
use super::lifecycle::LifecycleError;
use crate::api::JobState;

/// Follows job `id` until it ends: a progress bar on a terminal, a line
/// every second otherwise. Returns the job's result as `T`.
pub fn wait_job<T: DeserializeOwned>(
    socket: &Path,
    id: &str,
    what: &str,
) -> Result<T, LifecycleError> {
    let client = Client::new(socket);
    let bar = progress_bar(what);
    let mut last_line = Instant::now();
    loop {
        let j = client.job(id)?;
        let (done, total) = (j.done, j.total);
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        } else if last_line.elapsed() >= Duration::from_secs(1) {
            let pct = (done * 100).checked_div(total).unwrap_or(0);
            eprintln!("{what}: {pct}% ({} of {} MiB)", done >> 20, total >> 20);
            last_line = Instant::now();
        }
        match j.state {
            JobState::Succeeded => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                let result = j.result.unwrap_or_default();
                return serde_json::from_value(result.clone()).map_err(|e| {
                    ClientError::Malformed(format!("job {id}'s result: {e}: {result}")).into()
                });
            }
            JobState::Failed => {
                if let Some(b) = &bar {
                    b.abandon();
                }
                return Err(LifecycleError::JobFailed(
                    j.error.unwrap_or_else(|| "the job failed".into()),
                ));
            }
            JobState::Running => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A progress bar on a terminal, nothing otherwise.
pub fn progress_bar(what: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_message(what.to_string());
        b
    })
}
