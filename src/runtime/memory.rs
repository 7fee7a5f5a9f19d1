//! How much memory this process may use: the machine's, or its control group's limit when
//! that is lower (a container, a systemd `MemoryMax=`). For budgets sized from memory.

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
    fn this_machine_has_some() {
        assert!(usable_memory().is_some_and(|m| m > 0));
    }
}
