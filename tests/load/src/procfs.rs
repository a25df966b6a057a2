//! Resident memory and CPU time of server processes, read from /proc, and
//! this process's open-file limit.

use std::fs;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Clock ticks per second of the utime and stime fields in /proc/PID/stat.
// NOTE: this is Linux's USER_HZ, 100 on every mainstream architecture; it
// is not read from sysconf(_SC_CLK_TCK), which would need libc.
const TICKS_PER_SECOND: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ProcessSample {
    pub pid: u32,
    /// VmRSS from /proc/PID/status, in KiB.
    pub rss_kib: u64,
    /// User plus system CPU time since the process started, in seconds.
    pub cpu_s: f64,
}

/// Reads VmRSS and CPU time of `pid`.
pub fn sample(pid: u32) -> Result<ProcessSample> {
    let status_path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&status_path)
        .with_context(|| format!("reading {status_path} failed; is server PID {pid} running?"))?;
    let rss_kib = parse_vm_rss(&status)
        .with_context(|| format!("{status_path} has no VmRSS line (a kernel thread?)"))?;
    let stat_path = format!("/proc/{pid}/stat");
    let stat =
        fs::read_to_string(&stat_path).with_context(|| format!("reading {stat_path} failed"))?;
    let ticks = parse_cpu_ticks(&stat).with_context(|| format!("{stat_path} is malformed"))?;
    Ok(ProcessSample {
        pid,
        rss_kib,
        cpu_s: ticks as f64 / TICKS_PER_SECOND,
    })
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => Some(value),
        _ => None,
    }
}

/// Returns utime + stime from a /proc/PID/stat line. The command name in
/// field 2 is in parentheses and may contain spaces, so fields are counted
/// from the last `)`: utime and stime are fields 14 and 15.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Returns this process's soft limit on open files.
pub fn open_file_limit() -> Result<u64> {
    let limits =
        fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits failed")?;
    parse_open_file_limit(&limits)
}

fn parse_open_file_limit(limits: &str) -> Result<u64> {
    let Some(line) = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
    else {
        bail!("/proc/self/limits has no \"Max open files\" line");
    };
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()
        .unwrap_or_default();
    if soft == "unlimited" {
        return Ok(u64::MAX);
    }
    soft.parse()
        .with_context(|| format!("invalid open-file limit {soft:?} in /proc/self/limits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_in_kib() {
        let status = "Name:\tnexus-host\nVmPeak:\t  900 kB\nVmRSS:\t   51234 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(51_234));
        assert_eq!(parse_vm_rss("Name:\tkworker\n"), None);
    }

    #[test]
    fn cpu_ticks_with_spaces_in_name() {
        let stat = "1234 (node server) S 1 1234 1234 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 11 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
    }

    #[test]
    fn open_file_limit_line() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            20000                20000                files\n";
        assert_eq!(parse_open_file_limit(limits).expect("parsed"), 20_000);
    }

    #[test]
    fn own_process_is_readable() {
        let own = sample(std::process::id()).expect("own /proc entry");
        assert!(own.rss_kib > 0);
    }
}
