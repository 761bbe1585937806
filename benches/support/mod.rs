//! What the process-level benchmarks share: free ports, processes that die with the bench,
//! and reading a process's CPU time and memory from /proc.

#![allow(dead_code)] // each bench uses its own part

use std::process::Child;
use std::time::Duration;

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on this port; panics with `what` if nothing
/// does within `limit`.
pub(crate) fn wait_for_port(port: u16, what: &str, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on port {port} within {limit:?}");
}

/// A child process killed (and reaped) when dropped, so a failed bench leaves nothing behind.
#[derive(Debug)]
pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    /// SIGTERM first, so an nginx master stops its workers; SIGKILL after 3 s.
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.0.id().to_string())
            .status();
        for _ in 0..150 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds a process has used so far (user + system), from /proc.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|t| t.parse::<f64>().ok()).sum()
    });
    ticks / 100.0
}

/// A process and its descendants (an nginx master and its workers), from /proc.
pub(crate) fn process_tree(pid: u32) -> Vec<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(
            children
                .split_whitespace()
                .filter_map(|c| c.parse().ok())
                .flat_map(process_tree),
        )
        .collect()
}

/// CPU seconds of a process and its descendants.
pub(crate) fn tree_cpu_seconds(pid: u32) -> f64 {
    process_tree(pid).into_iter().map(cpu_seconds).sum()
}

/// Seconds of one CPU from /proc/stat, since boot.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CoreSeconds {
    /// User, nice, system, irq and softirq (not idle, iowait or steal): all that ran on it,
    /// the network work charged to no process included.
    pub(crate) busy: f64,
    /// Taken by the hypervisor for other guests while this one had work for the CPU.
    pub(crate) steal: f64,
    /// All of it, idle included.
    pub(crate) all: f64,
}

pub(crate) fn core_seconds(cpu: usize) -> CoreSeconds {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let name = format!("cpu{cpu}");
    let Some(fields) = stat.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(name.as_str())).then(|| {
            f.map(|t| t.parse::<f64>().unwrap_or(0.0) / 100.0)
                .collect::<Vec<_>>()
        })
    }) else {
        return CoreSeconds::default();
    };
    // user nice system idle iowait irq softirq steal (guest and guest_nice are within user)
    let sum = |i: &[usize]| i.iter().filter_map(|&i| fields.get(i)).sum::<f64>();
    CoreSeconds {
        busy: sum(&[0, 1, 2, 5, 6]),
        steal: sum(&[7]),
        all: sum(&[0, 1, 2, 3, 4, 5, 6, 7]),
    }
}

/// A line of /proc/<pid>/status in MiB: `VmRSS` (now) or `VmHWM` (peak).
pub(crate) fn memory_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}
