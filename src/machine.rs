//! What the machine can hold: sizes derived from the configuration are checked against the
//! memory available before anything that large is allocated.

use crate::{Error, Result};

/// Bytes of memory available to new allocations (`MemAvailable` of `/proc/meminfo`), or `None`
/// where that is not known (then only the absolute limits apply).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Errors, naming `key`, when `bytes` (what `what` would take) exceed half the available
/// memory: the rest is the model's and the run's.
pub fn check_fits(key: &str, what: &str, bytes: Option<u64>) -> Result<()> {
    let gb = |b: u64| b as f64 / 1e9;
    let Some(bytes) = bytes else {
        return Err(Error::config(key, format!("{what} would take more bytes than a u64 counts")));
    };
    if let Some(avail) = available_memory() {
        if bytes > avail / 2 {
            return Err(Error::config(
                key,
                format!(
                    "{what} would take {:.1} GB, more than half of the {:.1} GB this machine has available",
                    gb(bytes),
                    gb(avail)
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_beyond_the_machine_are_refused() {
        assert!(check_fits("k", "a small table", Some(1024)).is_ok());
        let e = check_fits("intrinsic_dim", "the matrix", None).unwrap_err().to_string();
        assert!(e.contains("intrinsic_dim"), "{e}");
        if available_memory().is_some() {
            let e = check_fits("n_prompt_tokens", "A", Some(u64::MAX / 2)).unwrap_err().to_string();
            assert!(e.contains("n_prompt_tokens") && e.contains("GB"), "{e}");
        }
    }
}
