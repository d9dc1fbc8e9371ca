//! Process metrics, named as the Prometheus client libraries name them
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...), read
//! from `/proc/self` on each scrape of the admin listener's `/metrics`, never
//! on the request path. What `/proc` cannot give is left out, except the
//! start time, which is then the time the collector was made.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// `AT_PAGESZ` and `AT_CLKTCK` in the auxiliary vector.
const AT_PAGESZ: usize = 6;
const AT_CLKTCK: usize = 17;

#[derive(Debug)]
pub struct ProcessCollector {
    /// Units of `/proc/self/stat`: clock ticks per second, bytes per page.
    ticks_per_second: u64,
    page_size: u64,
    /// Seconds since the epoch the process started at.
    start_time: f64,
}

/// One reading of `/proc/self/stat`.
#[derive(Debug, PartialEq)]
struct Stat {
    /// User plus system time, in clock ticks, of every thread the process had.
    cpu_ticks: u64,
    threads: u64,
    /// Clock ticks after boot.
    start_ticks: u64,
    virtual_bytes: u64,
    resident_pages: u64,
}

impl ProcessCollector {
    /// Reads the units and the start time once, at start-up.
    pub fn new() -> Self {
        let auxv = std::fs::read("/proc/self/auxv").unwrap_or_default();
        let ticks_per_second = auxv_value(&auxv, AT_CLKTCK)
            .filter(|&t| t > 0)
            .unwrap_or(100);
        let page_size = auxv_value(&auxv, AT_PAGESZ)
            .filter(|&p| p > 0)
            .unwrap_or(4096);
        let start_time = match (
            read("/proc/stat", boot_time),
            read("/proc/self/stat", parse_stat),
        ) {
            (Some(boot), Some(stat)) => {
                boot as f64 + stat.start_ticks as f64 / ticks_per_second as f64
            }
            _ => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        };
        Self {
            ticks_per_second,
            page_size,
            start_time,
        }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        put(
            e,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
            ConstGauge::new(self.start_time),
        )?;
        if let Some(stat) = read("/proc/self/stat", parse_stat) {
            put(
                e,
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                ConstCounter::new(stat.cpu_ticks as f64 / self.ticks_per_second as f64),
            )?;
            let resident = stat.resident_pages.saturating_mul(self.page_size);
            put(
                e,
                "process_resident_memory_bytes",
                "Resident memory size, in bytes",
                ConstGauge::new(resident),
            )?;
            put(
                e,
                "process_virtual_memory_bytes",
                "Virtual memory size, in bytes",
                ConstGauge::new(stat.virtual_bytes),
            )?;
            put(
                e,
                "process_threads",
                "Operating system threads",
                ConstGauge::new(stat.threads),
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            let open = fds.count() as u64;
            put(
                e,
                "process_open_fds",
                "Open file descriptors",
                ConstGauge::new(open),
            )?;
        }
        if let Some(max) = read("/proc/self/limits", max_open_files) {
            put(
                e,
                "process_max_fds",
                "Most file descriptors the process may open (the soft limit)",
                ConstGauge::new(max),
            )?;
        }
        Ok(())
    }
}

/// Encodes one metric with its descriptor.
fn put(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// Reads a `/proc` file and parses it; None where either fails.
fn read<T>(path: &str, parse: fn(&str) -> Option<T>) -> Option<T> {
    parse(&std::fs::read_to_string(path).ok()?)
}

/// The value of `key` in an auxiliary vector (native-endian word pairs).
fn auxv_value(auxv: &[u8], key: usize) -> Option<u64> {
    const WORD: usize = std::mem::size_of::<usize>();
    auxv.chunks_exact(2 * WORD).find_map(|pair| {
        let (k, v) = pair.split_at(WORD);
        let k = usize::from_ne_bytes(k.try_into().ok()?);
        let v = usize::from_ne_bytes(v.try_into().ok()?);
        (k == key).then_some(v as u64)
    })
}

/// `btime` of `/proc/stat`: the boot time, in seconds since the epoch.
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Parses `/proc/self/stat`. The command name in parentheses may itself hold
/// spaces and parentheses, so the fields are counted from the last `)`.
fn parse_stat(s: &str) -> Option<Stat> {
    let (_, rest) = s.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i)?.parse::<u64>().ok();
    // After the name: state (0) ... utime (11), stime (12), ... num_threads
    // (17), itrealvalue (18), starttime (19), vsize (20), rss (21).
    Some(Stat {
        cpu_ticks: field(11)?.checked_add(field(12)?)?,
        threads: field(17)?,
        start_ticks: field(19)?,
        virtual_bytes: field(20)?,
        resident_pages: field(21)?,
    })
}

/// The soft limit of `Max open files` in `/proc/self/limits` (None when unlimited).
fn max_open_files(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with spaces and a `)` of its own.
        let line = "4242 (we ird) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    150 25 0 0 20 0 7 0 123456 98304000 2048 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 0 0 0 0 17 0 0 0 0 0 0\n";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                cpu_ticks: 175,
                threads: 7,
                start_ticks: 123_456,
                virtual_bytes: 98_304_000,
                resident_pages: 2048,
            })
        );
        assert_eq!(parse_stat("4242 (cut short) S 1 2 3"), None);
        assert_eq!(parse_stat("no parenthesis at all"), None);
    }

    #[test]
    fn limits_boot_time_and_auxv_are_read() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(1024));
        assert_eq!(
            max_open_files(&limits.replace("1024     ", "unlimited")),
            None
        );
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1764000000\nprocesses 9\n"),
            Some(1_764_000_000)
        );
        assert_eq!(boot_time("cpu  1 2 3\n"), None);
        let mut auxv = Vec::new();
        for (k, v) in [(AT_PAGESZ, 16384usize), (AT_CLKTCK, 100), (0, 0)] {
            auxv.extend_from_slice(&k.to_ne_bytes());
            auxv.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(auxv_value(&auxv, AT_PAGESZ), Some(16384));
        assert_eq!(auxv_value(&auxv, AT_CLKTCK), Some(100));
        assert_eq!(auxv_value(&auxv, 33), None);
        // A truncated pair is not read.
        assert_eq!(auxv_value(&auxv[..12], AT_PAGESZ), None);
    }

    /// The collector's output on this very process, through the registry's encoder.
    #[test]
    fn a_scrape_reports_this_process() {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(ProcessCollector::new()));
        // Burn CPU until the kernel has counted a tick of it.
        let ticks = || {
            let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
            parse_stat(&stat).unwrap().cpu_ticks
        };
        let mut x = 0u64;
        while ticks() == 0 {
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        let value = |name: &str| -> f64 {
            out.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{name} missing from:\n{out}"))
                .parse()
                .unwrap()
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = value("process_start_time_seconds");
        assert!(
            start <= now + 1.0 && start > now - 24.0 * 3600.0,
            "start {start}, now {now}"
        );
        assert!(value("process_cpu_seconds_total") > 0.0);
        assert!(value("process_resident_memory_bytes") > 1_000_000.0);
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
        assert!(value("process_threads") >= 1.0);
        let open = value("process_open_fds");
        assert!(open >= 3.0, "stdin, stdout and stderr at least: {open}");
        assert!(value("process_max_fds") >= open);
        assert!(out.contains("# TYPE process_cpu_seconds counter"), "{out}");
    }
}
