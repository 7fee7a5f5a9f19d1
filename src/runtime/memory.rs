//! How much memory this process may use: the machine's, or its control group's limit when
//! that is lower (a container, a systemd `MemoryMax=`), for budgets sized from memory; and
//! giving back what it freed.

/// Bytes of memory usable by this process, `None` when neither figure can be read.
pub(crate) fn usable_memory() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total(&text));
    let group = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            let file = format!("/sys/fs/cgroup{}/memory.max", cgroup_path(&text)?);
            std::fs::read_to_string(file).ok()
        })
        .and_then(|text| cgroup_limit(&text));
    match (total, group) {
        (Some(t), Some(g)) => Some(t.min(g)),
        (t, g) => t.or(g),
    }
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// This process's cgroup v2 path (the `0::` line of `/proc/self/cgroup`).
fn cgroup_path(cgroup: &str) -> Option<&str> {
    cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// A cgroup v2 `memory.max`: bytes, or `max` for none.
fn cgroup_limit(max: &str) -> Option<u64> {
    max.trim().parse().ok()
}

/// Gives the system back the free memory the allocator holds between live allocations.
///
/// glibc's allocator returns memory only from the top of its heaps. A wave of tunnels
/// coming up (a fleet reconnecting after a restart) leaves what their handshakes used free
/// but scattered among the tunnels' long-lived allocations, and it stays resident: about
/// 4 KiB per QUIC tunnel (docs/benchmarks.md, issue 33). `malloc_trim` walks the heaps and
/// gives back every whole free page, holding each heap's lock in turn (measured in
/// docs/benchmarks.md): call it after a wave, not on every connection, and off the
/// runtime's threads. Returns whether it gave anything back; a no-op (false) where the
/// allocator is not glibc's.
pub(crate) fn give_back_free() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    {
        // SAFETY: malloc_trim takes a padding in bytes and touches only the allocator's
        // own state, under its own locks; any thread may call it at any time.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// This process's resident memory in bytes (Linux; `None` elsewhere or if unreadable).
pub(crate) fn resident() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_machines_memory_and_a_groups_limit() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:  100 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_576_000 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(
            cgroup_path("0::/system.slice/revproxy.service\n"),
            Some("/system.slice/revproxy.service")
        );
        assert_eq!(cgroup_limit("536870912\n"), Some(512 << 20));
        assert_eq!(cgroup_limit("max\n"), None, "no limit");
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn memory_freed_between_live_allocations_goes_back_to_the_system() {
        // A heap of small blocks, 15 of every 16 freed: free but scattered among live
        // ones, as a wave of handshakes leaves it, and resident until given back. (The
        // figures are the process's: other tests would have to take 50 MiB meanwhile to
        // hide the 60 given back.)
        let mut blocks: Vec<Vec<u8>> = (0..64 * 1024).map(|i| vec![i as u8; 1000]).collect();
        for (i, block) in blocks.iter_mut().enumerate() {
            if i % 16 != 1 {
                *block = Vec::new();
            }
        }
        let before = resident().expect("VmRSS");
        assert!(
            give_back_free(),
            "about 60 MiB lay free between live blocks"
        );
        let after = resident().expect("VmRSS");
        assert!(
            after + 8 * 1024 * 1024 < before,
            "resident {before} bytes before, {after} after"
        );
        assert!(
            blocks[1].iter().all(|b| *b == 1),
            "live blocks are untouched"
        );
    }

    #[test]
    fn this_machine_has_some() {
        assert!(usable_memory().is_some_and(|m| m > 0));
    }
}
