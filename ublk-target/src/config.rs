//! Node configuration: one TOML file per node (`nvmirrord --config node.toml`).
//!
//! Parsing is two steps: serde reads the file (unknown keys are errors, so a typo is
//! caught), then [`NodeConfig::validate`] checks every value against the others and
//! names the offending field and what would be valid.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::block::{BLOCK_SIZE, MAX_IO_BYTES};
/// The busy-poll default follows the CPUs there are; the rule lives with the link.
pub use rdma_link::{default_busy_poll_us, BUSY_POLL_MIN_CPUS};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {problem}")]
    Invalid { field: String, problem: String },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A byte count written either as an integer or as a string such as "64MiB" or "1 GiB".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<ByteSize, String> {
        parse_size::Config::new()
            .with_binary()
            .parse_size(s.trim())
            .map(ByteSize)
            .map_err(|e| {
                format!("{s:?} is not a size ({e}); write e.g. \"64MiB\", \"1GiB\" or a byte count")
            })
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut u = 0;
        while v >= 1024.0 && u < UNITS.len() - 1 {
            v /= 1024.0;
            u += 1;
        }
        if u == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{v:.1} {}", UNITS[u])
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node: NodeSection,
    pub nvram: NvramSection,
    #[serde(default)]
    pub flusher: FlusherSection,
    /// Two-node operation; absent for a single node.
    pub cluster: Option<ClusterSection>,
    /// Log shipping (claim set C): this node is a source or the destination; absent
    /// otherwise. A node is in a pair or in log shipping, not both.
    pub shipping: Option<ShippingSection>,
    /// The LUNs this node serves (none on a log-shipping destination).
    #[serde(default, rename = "lun")]
    pub luns: Vec<LunSection>,
    /// The metrics endpoint (docs/metrics.md); absent: off.
    pub metrics: Option<MetricsSection>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address and port of the HTTP endpoint serving `/metrics` for Prometheus, such as
    /// "127.0.0.1:9477". It has no authentication: keep it on localhost or a management
    /// network.
    pub listen: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportKind {
    Tcp,
    Rdma,
}

/// What to do with a write whose mirror copy could not be made (partner down).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DegradedPolicy {
    /// Acknowledge only once the write is on the medium: still two copies (NVRAM + medium).
    WriteThrough,
    /// Acknowledge from the local NVRAM alone: fast, but a single copy until it is flushed.
    Nvram,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReservationMode {
    #[default]
    None,
    Scsi3,
}

/// Where a cluster's LUNs live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StorageMode {
    /// One medium per LUN that every node sees (dual-ported SAS, iSCSI); the ownership
    /// table and the disk leases sit at its end.
    #[default]
    Shared,
    /// Each node its own medium per LUN; every write reaches both (shared-nothing). The
    /// table and the leases sit on `cluster.arbiter`, a small device both nodes see.
    Own,
}

/// `[cluster.voters]`: the arbiter as three voters instead of a device (docs/shared-nothing.md,
/// "The quorum arbiter"). Each slot of the table and of the leases is a register kept by a
/// majority of the two data nodes' voters and the tie-breaker's.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VotersSection {
    /// The pair's vote link: the first `[[cluster.node]]` listens on its address's IP at this
    /// port, the second connects to it. Not the mirror link's port.
    pub port: u16,
    /// The tie-breaker's node id (`nvmirror-tiebreaker --node-id`): not 1 or 2, which are
    /// the data nodes' (their places in `[[cluster.node]]`).
    pub tiebreaker_id: u32,
    /// Where the tie-breaker listens for each data node (`--serve ID=ADDR`), in
    /// `[[cluster.node]]` order, e.g. ["10.0.0.3:7481", "10.0.0.3:7482"].
    pub tiebreaker: Vec<String>,
    /// Where this node keeps its voter's state and its ballot round (`voter.state`,
    /// `voter.ballot`); create them once with `nvmirrorctl init-voter`.
    #[serde(default = "default_voter_dir")]
    pub state_dir: PathBuf,
}

fn default_voter_dir() -> PathBuf {
    PathBuf::from("/var/lib/nvmirror")
}

impl VotersSection {
    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("voter.state")
    }

    pub fn ballot_file(&self) -> PathBuf {
        self.state_dir.join("voter.ballot")
    }
}

/// The shared secret in `path` (the config field `field`), at least 16 bytes.
pub fn read_secret(field: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    let secret =
        std::fs::read(path).with_context(|| format!("reading {field} {}", path.display()))?;
    let secret: Vec<u8> = secret.trim_ascii().to_vec();
    if secret.len() < 16 {
        anyhow::bail!(
            "{field} {}: the secret must be at least 16 bytes (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
            path.display()
        );
    }
    Ok(secret)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TakeoverPolicy {
    /// Take over as soon as the partner misses its heartbeats.
    Auto,
    /// Only on `nvmirrorctl takeover` (or the Pacemaker agent).
    Manual,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Identifies the cluster; both nodes and the table on the medium must agree.
    pub id: u64,
    /// File holding the shared secret (at least 16 bytes) used to authenticate the partner.
    pub secret_file: PathBuf,
    #[serde(default = "default_transport")]
    pub transport: TransportKind,
    #[serde(default = "default_hb_interval")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "default_hb_timeout")]
    pub heartbeat_timeout_ms: u64,
    /// After traffic, poll the link this long before sleeping (0 = never); the default
    /// depends on the CPUs there are ([`default_busy_poll_us`]).
    #[serde(default = "default_busy_poll_us")]
    pub busy_poll_us: u64,
    /// Authenticate every mirror-link message after the handshake with a MAC (keyed
    /// BLAKE3), so that nobody on the network path can inject, alter or replay traffic (write
    /// the partner's second store). `false` authenticates the handshake only and guards the
    /// frames against accidents alone (crc32c over TCP; RDMA's own ICRC, and the records'
    /// crc32c, checked before a mirrored copy is used), as DRBD does by default: for a
    /// dedicated back-to-back link or an isolated fabric. Both nodes must agree.
    #[serde(default = "default_frame_mac")]
    pub frame_mac: bool,
    #[serde(default = "default_takeover")]
    pub takeover: TakeoverPolicy,
    /// How long I/O to the partner's ranges rides out the partner's loss (the link down
    /// after it was up) before it fails with EIO: it waits for a takeover to make the range
    /// ours (this node's under `takeover = "auto"`, the operator's or Pacemaker's under
    /// `manual`) or for the partner's return (a restart in place), then runs. 0: fail at
    /// once. Before the partner first connects, such I/O fails at once whatever this says.
    #[serde(default = "default_forward_wait")]
    pub forward_wait_s: u64,
    /// Disk heartbeat: every node rewrites its slot on the shared medium this often...
    #[serde(default = "default_disk_heartbeat")]
    pub disk_heartbeat_ms: u64,
    /// ... and each write keeps its lease (its right to serve) this long. A node whose
    /// heartbeat stopped changing is dead after about 1.1 x this + the I/O timeout + one
    /// heartbeat (see docs/arbitration.md).
    #[serde(default = "default_disk_lease")]
    pub disk_lease_ms: u64,
    /// The longest a medium I/O may take; a slower heartbeat write does not renew the lease.
    #[serde(default = "default_medium_io_timeout")]
    pub medium_io_timeout_ms: u64,
    #[serde(default = "default_degraded")]
    pub degraded: DegradedPolicy,
    /// The watchdog device this node pets while none of its medium writes hangs (its
    /// self-fence, see `watchdog`): "/dev/watchdog" (a hardware watchdog or `softdog`).
    /// Unset: no self-fence (`config check` warns when `takeover = "auto"`).
    #[serde(default)]
    pub watchdog: Option<PathBuf>,
    /// Fencing at the device: "scsi3" registers this node's key with every LUN's medium and
    /// preempts a dead partner's key on takeover (SCSI-3 persistent reservations; the medium
    /// must be a SCSI disk). "none": the disk lease and the watchdog alone.
    #[serde(default)]
    pub reservations: ReservationMode,
    /// The watchdog's timeout in whole seconds; at most what the disk lease timing allows
    /// (the default).
    #[serde(default)]
    pub watchdog_timeout_s: Option<u32>,
    /// "shared" (default): both nodes write one medium per LUN. "own": each node its own.
    #[serde(default)]
    pub storage: StorageMode,
    /// With `storage = "own"`: a small device (at least 1 MiB) both nodes see, holding the
    /// ownership table and the disk leases (as sbd's disk does), e.g. an iSCSI LUN. The
    /// other choice is `[cluster.voters]`.
    #[serde(default)]
    pub arbiter: Option<PathBuf>,
    /// With `storage = "own"` and no shared device: the ownership table and the leases on a
    /// majority of three voters, this node, the partner and a diskless tie-breaker
    /// (`nvmirror-tiebreaker`), as DRBD 9's quorum with a tie-breaker. See [`VotersSection`].
    #[serde(default)]
    pub voters: Option<VotersSection>,
    /// With `storage = "own"`: the most MiB per second a resync reads from this node's
    /// medium to copy onto the partner's (DRBD's `c-max-rate` plays this part), so
    /// the application's I/O keeps most of the medium; 0: as fast as the media go.
    #[serde(default = "default_resync_rate")]
    pub resync_rate_mib_s: u64,
    /// Write priority follows the writer: a range this node keeps writing to through the
    /// partner is handed over to it (see [`WritePrioritySection`]). Unset: ranges stay where
    /// the config, a takeover or an operator put them.
    #[serde(default)]
    pub write_priority: Option<WritePrioritySection>,
    /// Reads of the partner's ranges are served from this node's medium (its own, or the
    /// shared one) and second store while the partner grants a read lease
    /// (`cluster::ReadLeases`), instead of crossing the link. On unless set to false with
    /// `storage = "own"`; off unless set to true with a shared medium. The price: after a
    /// connection reset, the partner's first write without us of a range waits up to 0.6
    /// heartbeat timeouts for the lease to run out. See [`ClusterSection::local_reads_on`].
    #[serde(default)]
    pub local_reads: Option<bool>,
    /// Both nodes, in the same order on both; the first listens, the second connects.
    #[serde(rename = "node")]
    pub nodes: Vec<ClusterNode>,
}

impl ClusterSection {
    /// Whether this node reads the partner's ranges locally under its read lease: with
    /// `storage = "own"` unless `local_reads = false`; with a shared medium only if
    /// `local_reads = true`.
    pub fn local_reads_on(&self) -> bool {
        match self.storage {
            StorageMode::Own => self.local_reads != Some(false),
            StorageMode::Shared => self.local_reads == Some(true),
        }
    }

    /// The disk lease's timing from the `disk_*` settings.
    pub fn lease_timing(&self) -> crate::lease::LeaseTiming {
        crate::lease::LeaseTiming {
            renew: std::time::Duration::from_millis(self.disk_heartbeat_ms),
            lease: std::time::Duration::from_millis(self.disk_lease_ms),
            io_timeout: std::time::Duration::from_millis(self.medium_io_timeout_ms),
        }
    }

    /// The watchdog's timeout: as configured, or the longest the lease timing allows.
    pub fn watchdog_timeout(&self) -> u32 {
        self.watchdog_timeout_s
            .unwrap_or_else(|| crate::watchdog::max_timeout(&self.lease_timing()))
    }
}

/// Which end of log shipping a node is (docs/log-shipping.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShippingRole {
    /// Serves its LUNs from its own medium and sends every staged record to the destination;
    /// a write is acknowledged once both NVRAMs hold it.
    Source,
    /// Keeps each source's records in an NVRAM area of its own.
    Destination,
}

/// Log shipping: N sources send their NVRAM records to one destination.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShippingSection {
    pub role: ShippingRole,
    /// Identifies the group: the destination and its sources agree on it.
    pub id: u64,
    /// File holding the shared secret (at least 16 bytes) that authenticates the other end.
    pub secret_file: PathBuf,
    #[serde(default = "default_transport")]
    pub transport: TransportKind,
    #[serde(default = "default_hb_interval")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "default_hb_timeout")]
    pub heartbeat_timeout_ms: u64,
    #[serde(default = "default_busy_poll_us")]
    pub busy_poll_us: u64,
    /// As `cluster.frame_mac`: every message after the handshake carries a MAC (on by
    /// default). The destination's setting applies to all its sources, which must agree.
    #[serde(default = "default_frame_mac")]
    pub frame_mac: bool,
    /// Source: how a write is acknowledged while the destination is away.
    #[serde(default = "default_degraded")]
    pub degraded: DegradedPolicy,
    /// Source: the destination's node name and the address it listens on for this source.
    pub destination: Option<ShippingDestination>,
    /// Destination: every source, in a fixed order (each has an NVRAM area here, in order).
    #[serde(default, rename = "source")]
    pub sources: Vec<ShippedSource>,
    /// Destination: where each source's log files go (`DIR/SOURCE/`), on storage whose
    /// fdatasync means durable.
    pub dir: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShippingDestination {
    pub name: String,
    /// host:port the destination listens on for this source.
    pub address: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShippedSource {
    /// The source's node.name.
    pub name: String,
    /// ip:port this destination listens on for this source (one port per source).
    pub listen: String,
    /// The source's nvram.size: its NVRAM area here has the same geometry, so each record
    /// lands at the offset it has in the source's log.
    pub nvram_size: ByteSize,
}

impl ShippingSection {
    /// The id a node `name` has on a log-shipping link: both ends derive it from the names
    /// they are configured with, so a source that reaches another source's port is refused.
    pub fn link_node_id(name: &str) -> u32 {
        rdma_link::checksum::crc32c(name.as_bytes()) | 1
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterNode {
    pub name: String,
    /// host:port of the node's mirror link.
    pub address: String,
}

fn check_voters(v: &VotersSection, c: &ClusterSection) -> Result<(), ConfigError> {
    if v.port == 0 {
        return Err(invalid(
            "cluster.voters.port",
            "must be a port number (1-65535) for the pair's vote link, e.g. 7801",
        ));
    }
    if let Some(mirror) = c
        .nodes
        .first()
        .and_then(|n| n.address.parse::<std::net::SocketAddr>().ok())
    {
        if mirror.port() == v.port {
            return Err(invalid(
                "cluster.voters.port",
                format!("{} is the mirror link's port (cluster.node[0].address); the vote link needs a port of its own, e.g. {}", v.port, v.port.wrapping_add(1).max(1)),
            ));
        }
    }
    let data_ids: Vec<u32> = (1..=c.nodes.len() as u32).collect();
    if data_ids.contains(&v.tiebreaker_id) || v.tiebreaker_id == 0 {
        return Err(invalid(
            "cluster.voters.tiebreaker_id",
            format!("{} is a data node's id (the data nodes are 1 to {}, their places in [[cluster.node]]); give the tie-breaker another, e.g. {}", v.tiebreaker_id, c.nodes.len(), c.nodes.len() + 1),
        ));
    }
    if v.tiebreaker.len() != c.nodes.len() {
        return Err(invalid(
            "cluster.voters.tiebreaker",
            format!("names {} address(es); give one per [[cluster.node]] ({}), in the same order: where the tie-breaker listens for that node (its --serve ID=ADDR)", v.tiebreaker.len(), c.nodes.len()),
        ));
    }
    for (i, a) in v.tiebreaker.iter().enumerate() {
        if a.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                format!("cluster.voters.tiebreaker[{i}]"),
                format!("{a:?} is not ip:port, e.g. \"10.0.0.3:7481\""),
            ));
        }
    }
    if v.state_dir.as_os_str().is_empty() || v.state_dir.is_relative() {
        return Err(invalid(
            "cluster.voters.state_dir",
            format!("{:?} is not an absolute directory; e.g. \"/var/lib/nvmirror\" (a disk that keeps it across reboots, not /run)", v.state_dir),
        ));
    }
    Ok(())
}

fn default_transport() -> TransportKind {
    TransportKind::Tcp
}
fn default_hb_interval() -> u64 {
    250
}
fn default_hb_timeout() -> u64 {
    2000
}
/// Longest busy-poll window: beyond it a core spins without saving anything measurable.
const MAX_BUSY_POLL_US: u64 = 10_000;
fn default_disk_heartbeat() -> u64 {
    1000
}
fn default_disk_lease() -> u64 {
    4000
}
fn default_medium_io_timeout() -> u64 {
    2000
}
/// `[cluster.write_priority]`: when a node asks the partner for a range it writes to
/// (issue #17's policing protocol, hand-over part; `engine::write_priority`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WritePrioritySection {
    /// Writes to one range forwarded to its owner within `window_ms` after which this node
    /// asks for the range.
    #[serde(default = "default_ask_after_forwarded")]
    pub ask_after_forwarded: u32,
    #[serde(default = "default_priority_window")]
    pub window_ms: u64,
    /// An owner that wrote to a range itself within this keeps it (so two writers do not
    /// bounce it); a node that was refused asks again only after this.
    #[serde(default = "default_min_hold")]
    pub min_hold_ms: u64,
    /// True: a write to a range the partner holds is queued until the partner hands the range
    /// over (after it held it for `min_hold_ms`), then staged here; it is forwarded only if
    /// the range has not come within `queue_timeout_ms`. False: it is forwarded at once.
    #[serde(default)]
    pub queue_writes: bool,
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout_ms: u64,
}

impl Default for WritePrioritySection {
    fn default() -> Self {
        WritePrioritySection {
            ask_after_forwarded: default_ask_after_forwarded(),
            window_ms: default_priority_window(),
            min_hold_ms: default_min_hold(),
            queue_writes: false,
            queue_timeout_ms: default_queue_timeout(),
        }
    }
}

fn default_ask_after_forwarded() -> u32 {
    256
}
fn default_priority_window() -> u64 {
    1000
}
fn default_min_hold() -> u64 {
    5000
}
fn default_queue_timeout() -> u64 {
    10000
}

fn default_resync_rate() -> u64 {
    100
}
fn default_frame_mac() -> bool {
    true
}

fn default_forward_wait() -> u64 {
    60
}

fn default_takeover() -> TakeoverPolicy {
    TakeoverPolicy::Auto
}
fn default_degraded() -> DegradedPolicy {
    DegradedPolicy::WriteThrough
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// This node's name; also stamped into the NVRAM so another node's log is refused.
    pub name: String,
    /// Unix socket nvmirrorctl talks to. Default: /run/nvmirror/<name>.sock
    pub control_socket: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NvramSection {
    /// A file, a block device, /dev/pmemN or device-DAX /dev/daxN.M (needed for RDMA).
    pub path: PathBuf,
    /// Size to use. Required when `path` is a file that does not exist yet (it is created);
    /// optional otherwise (default: the whole file or device).
    pub size: Option<ByteSize>,
    /// Number of independent staging logs; each LUN range maps to one.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
}

fn default_partitions() -> u32 {
    4
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FlusherSection {
    /// Upper bound of data written to the medium between two syncs of the medium.
    #[serde(default = "default_batch")]
    pub batch_bytes: ByteSize,
    /// How long a small batch may wait to grow before it is written (ms).
    #[serde(default = "default_linger")]
    pub linger_ms: u64,
}

fn default_linger() -> u64 {
    DEFAULT_FLUSH_LINGER_MS
}

/// At low load the flusher writes at most this often per partition: the records are durable
/// (and mirrored) meanwhile, and each batch costs a medium sync, a checkpoint, a fencing read
/// and a release message, which compete with the write path for CPU.
pub const DEFAULT_FLUSH_LINGER_MS: u64 = 250;
/// Beyond a minute, a lightly loaded node would keep records in NVRAM for no gain.
const MAX_FLUSH_LINGER_MS: u64 = 60_000;

fn default_batch() -> ByteSize {
    ByteSize(8 << 20)
}

impl Default for FlusherSection {
    fn default() -> Self {
        FlusherSection {
            batch_bytes: default_batch(),
            linger_ms: default_linger(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LunSection {
    pub name: String,
    /// The storage medium: a file or block device.
    pub medium: PathBuf,
    /// LUN size. Default: the size of the medium.
    pub size: Option<ByteSize>,
    /// ublk device id: the device is /dev/ublkb<device_id>. Default: the kernel picks one.
    pub device_id: Option<u32>,
    /// Number of equal LUN ranges (the unit of ownership); default: nvram.partitions.
    pub ranges: Option<u32>,
    /// Cluster only: owner of each range, cycled (default: the nodes in turn).
    pub owners: Option<Vec<String>>,
    #[serde(default = "default_queues")]
    pub queues: u16,
    #[serde(default = "default_depth")]
    pub queue_depth: u16,
    /// Keep each queue's thread on the CPUs the kernel maps to that queue (libublk's
    /// placement). Default false: any CPU the daemon may use, since with one queue per CPU
    /// the mapped set is the submitter's own CPU, which the queue thread then has to share
    /// with the process whose I/O it serves.
    #[serde(default)]
    pub pin_queues: bool,
}

/// Most queues a LUN gets by default: one per CPU up to this (each queue is a thread that
/// stages, mirrors and reads on its own io_uring).
pub const DEFAULT_QUEUES_MAX: u16 = 4;

/// One queue per CPU, at most [`DEFAULT_QUEUES_MAX`].
pub fn default_queues() -> u16 {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get().min(DEFAULT_QUEUES_MAX as usize) as u16)
}
fn default_depth() -> u16 {
    64
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// Parses and validates config text (the path in errors is left empty).
    pub fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        let cfg: NodeConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the values that serde cannot: ranges, relations between fields, names.
    /// Sizes that depend on the devices (medium size, NVRAM size) are checked at open.
    /// Problems the config cannot rule out by itself because they depend on this machine:
    /// each a sentence with the fix. The daemon logs them at start; `config check` prints them.
    pub fn environment_warnings(&self) -> Vec<String> {
        use std::os::unix::fs::FileTypeExt;
        let mut warnings = Vec::new();
        let rdma = self
            .cluster
            .as_ref()
            .is_some_and(|c| c.transport == TransportKind::Rdma);
        let block_nvram =
            std::fs::metadata(&self.nvram.path).is_ok_and(|m| m.file_type().is_block_device());
        if rdma && block_nvram {
            warnings.push(format!(
                "nvram.path {} is a block device: on Linux >= 6.5 the RDMA transport cannot \
                 register its mapping (ibv_reg_mr fails with EFAULT) and the mirror link will not \
                 come up; put the NVRAM on device-DAX (/dev/daxN.M, `ndctl create-namespace \
                 --mode=devdax`) or set cluster.transport = \"tcp\"",
                self.nvram.path.display()
            ));
        }
        warnings.extend(self.stranded_nvram_warnings());
        if let Some(addr) = self.metrics_listen().filter(|a| !a.ip().is_loopback()) {
            warnings.push(format!(
                "metrics.listen {addr} is not a loopback address: anyone who can reach it reads the node's state (there is no authentication); keep it on a management network or firewall the port"
            ));
        }
        if let Some(c) = self.cluster.as_ref().filter(|c| !c.frame_mac) {
            warnings.push(format!(
                "cluster.frame_mac = false: only the handshake proves the cluster secret; afterwards anyone who can reach the mirror link's path ({}) can inject or alter its messages, e.g. write the partner's second store. Use it only on a dedicated link or an isolated fabric; remove the line to authenticate every message",
                c.nodes.iter().map(|n| n.address.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        if let Some(s) = self.shipping.as_ref().filter(|s| !s.frame_mac) {
            let path = match (&s.destination, s.sources.is_empty()) {
                (Some(d), _) => d.address.clone(),
                (None, false) => s
                    .sources
                    .iter()
                    .map(|x| x.listen.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                (None, true) => "the log-shipping links".into(),
            };
            warnings.push(format!(
                "shipping.frame_mac = false: only the handshake proves the group's secret; afterwards anyone who can reach the log-shipping link's path ({path}) can inject or alter its messages, e.g. records in the destination's log files. Use it only on a dedicated link or an isolated fabric; remove the line to authenticate every message"
            ));
        }
        if let Some(c) = &self.cluster {
            match &c.watchdog {
                None if c.takeover == TakeoverPolicy::Auto => warnings.push(
                    "cluster.watchdog is not set: with takeover = \"auto\" this node has no self-fence, so a medium write that hangs past medium_io_timeout_ms (a path that queues I/O) could land after the partner took the range over; set watchdog = \"/dev/watchdog\" (`modprobe softdog` where the machine has no hardware watchdog), or fence with Pacemaker (takeover = \"manual\", docs/pacemaker.md)".into(),
                ),
                Some(w) if !w.exists() => warnings.push(format!(
                    "cluster.watchdog {} does not exist: the daemon will refuse to start; load a watchdog driver (`modprobe softdog` where the machine has none)",
                    w.display()
                )),
                _ => {}
            }
        }
        warnings
    }

    /// A LUN range stages in one NVRAM partition ([`partition_of_range`]), so a layout
    /// where a node's ranges map to fewer partitions than there are leaves the rest of its
    /// log empty until a takeover, and a burst to one range fills a partition's share alone.
    pub fn stranded_nvram_warnings(&self) -> Vec<String> {
        if self.luns.is_empty() {
            // A log-shipping destination: its NVRAM holds the sources' partitions.
            return Vec::new();
        }
        let p = self.nvram.partitions.max(1);
        let nodes: Vec<String> = match &self.cluster {
            Some(c) => c.nodes.iter().map(|n| n.name.clone()).collect(),
            None => vec![self.node.name.clone()],
        };
        let cluster_nodes = self.cluster.as_ref().map_or(&[][..], |c| &c.nodes[..]);
        let mut used = vec![std::collections::BTreeSet::new(); nodes.len()];
        let mut first_range = 0u32;
        for lun in &self.luns {
            for (r, owner) in lun.range_owners(p, cluster_nodes).iter().enumerate() {
                if let Some(set) = used.get_mut(*owner as usize) {
                    set.insert(partition_of_range(first_range + r as u32, p as usize));
                }
            }
            first_range += lun.ranges(p);
        }
        let mut warnings = Vec::new();
        for (name, set) in nodes.iter().zip(&used) {
            if set.len() as u32 >= p {
                continue;
            }
            let fix = if nodes.len() > 1 {
                let owners: Vec<String> = nodes
                    .iter()
                    .flat_map(|n| std::iter::repeat_n(format!("{n:?}"), p as usize))
                    .collect();
                format!(
                    "give each LUN ranges = {} (partitions x nodes) and owners = [{}] \
                     (each node's ranges in a row, so they fall in different partitions)",
                    p as usize * nodes.len(),
                    owners.join(", ")
                )
            } else {
                format!("give the LUNs {p} ranges in all (lun.ranges), or set nvram.partitions to their number")
            };
            warnings.push(format!(
                "node {name} stages its writes in {} of its {p} NVRAM partitions ({:?}): a range \
                 stages in one partition, so the others stay empty until a takeover and a burst of \
                 writes to one range can use only 1/{p} of the log; {fix}",
                set.len(),
                set
            ));
        }
        warnings
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        valid_name("node.name", &self.node.name)?;
        if let Some(m) = &self.metrics {
            if m.listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    "metrics.listen",
                    format!(
                        "{:?} is not an address and port; write e.g. \"127.0.0.1:9477\" (or \"[::1]:9477\"), or remove [metrics] to turn the endpoint off",
                        m.listen
                    ),
                ));
            }
        }
        let p = self.nvram.partitions;
        if !(1..=256).contains(&p) {
            return Err(invalid(
                "nvram.partitions",
                format!("{p} is out of range; use 1 to 256"),
            ));
        }
        if let Some(size) = self.nvram.size {
            let min = self.min_nvram_bytes();
            if size.0 < min {
                return Err(invalid(
                    "nvram.size",
                    format!(
                        "{} is too small for {p} partitions; each partition must hold at least \
                         4 maximum-size writes, so use at least {} (or fewer partitions)",
                        size,
                        ByteSize(min)
                    ),
                ));
            }
        }
        if self.flusher.batch_bytes.0 < MAX_IO_BYTES {
            return Err(invalid(
                "flusher.batch_bytes",
                format!("must be at least {}", ByteSize(MAX_IO_BYTES)),
            ));
        }
        if self.flusher.linger_ms > MAX_FLUSH_LINGER_MS {
            return Err(invalid(
                "flusher.linger_ms",
                format!(
                    "{} is too long; use at most {MAX_FLUSH_LINGER_MS} (default {DEFAULT_FLUSH_LINGER_MS})",
                    self.flusher.linger_ms
                ),
            ));
        }
        if self.luns.len() > 16 {
            return Err(invalid(
                "lun",
                format!(
                    "{} LUNs are configured; at most 16 are supported per node",
                    self.luns.len()
                ),
            ));
        }
        let destination = self
            .shipping
            .as_ref()
            .is_some_and(|s| s.role == ShippingRole::Destination);
        if self.luns.is_empty() && !destination {
            return Err(invalid(
                "lun",
                "no LUN is configured; add a [[lun]] table with name and medium",
            ));
        }
        if let Some(s) = &self.shipping {
            self.validate_shipping(s)?;
        }
        if let Some(c) = &self.cluster {
            if c.nodes.len() != 2 {
                return Err(invalid(
                    "cluster.node",
                    format!(
                        "{} nodes are listed; a cluster has exactly 2 ([[cluster.node]] twice)",
                        c.nodes.len()
                    ),
                ));
            }
            if !c.nodes.iter().any(|n| n.name == self.node.name) {
                return Err(invalid(
                    "cluster.node",
                    format!(
                        "this node ({:?}, node.name) is not among the cluster's nodes",
                        self.node.name
                    ),
                ));
            }
            for (i, n) in c.nodes.iter().enumerate() {
                if n.address.parse::<std::net::SocketAddr>().is_err() {
                    return Err(invalid(
                        format!("cluster.node[{i}].address"),
                        format!("{:?} is not ip:port, e.g. \"192.168.10.1:7800\"", n.address),
                    ));
                }
            }
            check_heartbeat("cluster", c.heartbeat_interval_ms, c.heartbeat_timeout_ms)?;
            if c.forward_wait_s > 3600 {
                return Err(invalid(
                    "cluster.forward_wait_s",
                    format!("{} s is too long: I/O would hang that long; use at most 3600 (an hour), e.g. 60, or 0 to fail at once", c.forward_wait_s),
                ));
            }
            for (field, value) in [
                ("cluster.disk_heartbeat_ms", c.disk_heartbeat_ms),
                ("cluster.disk_lease_ms", c.disk_lease_ms),
                ("cluster.medium_io_timeout_ms", c.medium_io_timeout_ms),
            ] {
                if value > 600_000 {
                    return Err(invalid(
                        field,
                        format!("{value} is too long; use at most 600000 (10 minutes)"),
                    ));
                }
            }
            if let Err(why) = c.lease_timing().check() {
                return Err(invalid("cluster.disk_lease_ms", why));
            }
            if c.watchdog.is_some() || c.watchdog_timeout_s.is_some() {
                let most = crate::watchdog::max_timeout(&c.lease_timing());
                if most == 0 {
                    return Err(invalid(
                        "cluster.watchdog",
                        "the disk lease timing leaves no room for a watchdog of at least 1 s: it must fire before the partner may take over; raise cluster.medium_io_timeout_ms or cluster.disk_heartbeat_ms (their sum over 1.1, minus 0.25 s, is the longest watchdog timeout)",
                    ));
                }
                match c.watchdog_timeout_s {
                    Some(t) if t == 0 || t > most => {
                        return Err(invalid(
                            "cluster.watchdog_timeout_s",
                            format!("{t} s does not fit: use 1 to {most} s with these disk lease timings (the watchdog must reset this node before the partner may take over), or leave it unset"),
                        ))
                    }
                    Some(_) if c.watchdog.is_none() => {
                        return Err(invalid(
                            "cluster.watchdog_timeout_s",
                            "is set but cluster.watchdog is not; set watchdog = \"/dev/watchdog\" or remove the timeout",
                        ))
                    }
                    _ => {}
                }
            }
            match (c.storage, &c.arbiter, &c.voters) {
                (StorageMode::Own, None, None) => {
                    return Err(invalid(
                        "cluster.arbiter",
                        "storage = \"own\" needs a small device both nodes see for the ownership table and the disk leases; set arbiter = \"/dev/disk/by-id/...\" (at least 1 MiB), or use three voters instead ([cluster.voters] with a tie-breaker)",
                    ))
                }
                (StorageMode::Own, Some(_), Some(_)) => {
                    return Err(invalid(
                        "cluster.voters",
                        "is an arbiter, and so is cluster.arbiter: keep one of them",
                    ))
                }
                (StorageMode::Shared, Some(_), _) => {
                    return Err(invalid(
                        "cluster.arbiter",
                        "is only used with storage = \"own\"; with a shared medium the table sits at its end: remove it",
                    ))
                }
                (StorageMode::Shared, _, Some(_)) => {
                    return Err(invalid(
                        "cluster.voters",
                        "is only used with storage = \"own\"; with a shared medium the table and the leases sit at its end: remove [cluster.voters]",
                    ))
                }
                _ => {}
            }
            if let Some(v) = &c.voters {
                check_voters(v, c)?;
            }
            if c.storage == StorageMode::Own {
                if c.reservations != ReservationMode::None {
                    return Err(invalid(
                        "cluster.reservations",
                        "SCSI-3 reservations fence a shared medium; with storage = \"own\" no medium is shared: use reservations = \"none\"",
                    ));
                }
                if let Some(i) = self.luns.iter().position(|l| l.size.is_none()) {
                    return Err(invalid(
                        format!("lun[{i}].size"),
                        "with storage = \"own\" each node has its own medium and both must present the same LUN: set the size explicitly (the same on both nodes)",
                    ));
                }
            }
            if let Some(w) = &c.write_priority {
                if c.takeover == TakeoverPolicy::Manual {
                    return Err(invalid(
                        "cluster.write_priority",
                        "moves ranges by itself, but with takeover = \"manual\" the cluster manager (Pacemaker) decides where they are served: remove [cluster.write_priority]",
                    ));
                }
                for (field, value) in [
                    ("ask_after_forwarded", u64::from(w.ask_after_forwarded)),
                    ("window_ms", w.window_ms),
                    ("min_hold_ms", w.min_hold_ms),
                    ("queue_timeout_ms", w.queue_timeout_ms),
                ] {
                    if value == 0 {
                        return Err(invalid(
                            format!("cluster.write_priority.{field}"),
                            "must be at least 1; remove [cluster.write_priority] to keep ranges where they are",
                        ));
                    }
                }
            }
            if c.busy_poll_us > MAX_BUSY_POLL_US {
                return Err(invalid(
                    "cluster.busy_poll_us",
                    format!("{} is too long: a completion is polled for at most {MAX_BUSY_POLL_US} µs; use 0 to never poll", c.busy_poll_us),
                ));
            }
        }
        for (i, lun) in self.luns.iter().enumerate() {
            let f = |k: &str| format!("lun[{i}].{k}");
            if let Some(owners) = &lun.owners {
                let Some(c) = &self.cluster else {
                    return Err(invalid(
                        f("owners"),
                        "only meaningful with a [cluster] section",
                    ));
                };
                if owners.is_empty() || owners.iter().any(|o| !c.nodes.iter().any(|n| &n.name == o))
                {
                    return Err(invalid(
                        f("owners"),
                        "list node names from [[cluster.node]]",
                    ));
                }
            }
            valid_name(&f("name"), &lun.name)?;
            if self.luns[..i].iter().any(|o| o.name == lun.name) {
                return Err(invalid(f("name"), format!("{:?} is used twice", lun.name)));
            }
            if let Some(id) = lun.device_id {
                if self.luns[..i].iter().any(|o| o.device_id == Some(id)) {
                    return Err(invalid(f("device_id"), format!("{id} is used twice")));
                }
            }
            if let Some(size) = lun.size {
                if size.0 == 0 || size.0 % BLOCK_SIZE != 0 {
                    return Err(invalid(
                        f("size"),
                        format!("{} must be a non-zero multiple of 4096 bytes", size.0),
                    ));
                }
            }
            let r = lun.ranges.unwrap_or(p);
            if !(1..=4096).contains(&r) {
                return Err(invalid(
                    f("ranges"),
                    format!("{r} is out of range; use 1 to 4096"),
                ));
            }
            if !(1..=16).contains(&lun.queues) {
                return Err(invalid(
                    f("queues"),
                    format!("{} is out of range; use 1 to 16", lun.queues),
                ));
            }
            if !(1..=1024).contains(&lun.queue_depth) {
                return Err(invalid(
                    f("queue_depth"),
                    format!("{} is out of range; use 1 to 1024", lun.queue_depth),
                ));
            }
        }
        Ok(())
    }

    fn validate_shipping(&self, s: &ShippingSection) -> Result<(), ConfigError> {
        if self.cluster.is_some() {
            return Err(invalid(
                "shipping",
                "a node is either one of a [cluster] pair or in log shipping, not both: remove one of the sections",
            ));
        }
        check_heartbeat("shipping", s.heartbeat_interval_ms, s.heartbeat_timeout_ms)?;
        if s.busy_poll_us > MAX_BUSY_POLL_US {
            return Err(invalid(
                "shipping.busy_poll_us",
                format!(
                    "{} is too long; use at most {MAX_BUSY_POLL_US} (0: never poll)",
                    s.busy_poll_us
                ),
            ));
        }
        match s.role {
            ShippingRole::Source => {
                if s.dir.is_some() {
                    return Err(invalid(
                        "shipping.dir",
                        "is where the destination keeps the sources' log files; a source keeps none: remove it",
                    ));
                }
                if !s.sources.is_empty() {
                    return Err(invalid(
                        "shipping.source",
                        "is the destination's list of sources; a source names its destination in [shipping.destination] instead",
                    ));
                }
                let Some(d) = &s.destination else {
                    return Err(invalid(
                        "shipping.destination",
                        "a source needs its destination: add [shipping.destination] with name and address (the destination's listen address for this source)",
                    ));
                };
                valid_name("shipping.destination.name", &d.name)?;
                if d.name == self.node.name {
                    return Err(invalid(
                        "shipping.destination.name",
                        "names this node; the destination is another node",
                    ));
                }
                if d.address.parse::<std::net::SocketAddr>().is_err() {
                    return Err(invalid(
                        "shipping.destination.address",
                        format!("{:?} is not ip:port, e.g. \"192.168.10.9:7801\"", d.address),
                    ));
                }
            }
            ShippingRole::Destination => {
                if s.destination.is_some() {
                    return Err(invalid(
                        "shipping.destination",
                        "is for sources; this node is the destination: list its sources as [[shipping.source]]",
                    ));
                }
                match &s.dir {
                    None => {
                        return Err(invalid(
                            "shipping.dir",
                            "the destination writes each source's records to log files in it: add dir = \"/var/lib/nvmirror/shipping\" (a directory on durable storage)",
                        ))
                    }
                    Some(d) if !d.is_absolute() => {
                        return Err(invalid(
                            "shipping.dir",
                            format!("{} is relative; give an absolute path", d.display()),
                        ))
                    }
                    Some(_) => {}
                }
                if self.metrics.is_some() {
                    return Err(invalid(
                        "metrics",
                        "a log-shipping destination has no metrics endpoint yet (`nvmirrorctl status` shows what it holds of each source): remove [metrics]",
                    ));
                }
                if !self.luns.is_empty() {
                    return Err(invalid(
                        "lun",
                        "a log-shipping destination serves no LUN of its own (a source's image is served after `export`, which is not built yet): remove the [[lun]] tables",
                    ));
                }
                if !(1..=64).contains(&s.sources.len()) {
                    return Err(invalid(
                        "shipping.source",
                        format!("{} sources are listed; a destination serves 1 to 64 ([[shipping.source]] with name, listen and nvram_size)", s.sources.len()),
                    ));
                }
                let min = self.min_nvram_bytes();
                let mut ids = vec![ShippingSection::link_node_id(&self.node.name)];
                for (i, src) in s.sources.iter().enumerate() {
                    let f = |k: &str| format!("shipping.source[{i}].{k}");
                    valid_name(&f("name"), &src.name)?;
                    if src.name == self.node.name
                        || s.sources[..i].iter().any(|o| o.name == src.name)
                    {
                        return Err(invalid(
                            f("name"),
                            format!("{:?} is used twice (or names this node)", src.name),
                        ));
                    }
                    if src.listen.parse::<std::net::SocketAddr>().is_err() {
                        return Err(invalid(
                            f("listen"),
                            format!("{:?} is not ip:port, e.g. \"0.0.0.0:7801\"", src.listen),
                        ));
                    }
                    if s.sources[..i]
                        .iter()
                        .any(|o| same_port(&o.listen, &src.listen))
                    {
                        return Err(invalid(
                            f("listen"),
                            format!(
                                "{} is used twice: each source needs its own port",
                                src.listen
                            ),
                        ));
                    }
                    if src.nvram_size.0 % BLOCK_SIZE != 0 {
                        return Err(invalid(
                            f("nvram_size"),
                            format!("{} is not a multiple of 4 KiB (the areas lie one after the other); give the source's nvram.size, which must be one too", src.nvram_size),
                        ));
                    }
                    if src.nvram_size.0 < min {
                        return Err(invalid(
                            f("nvram_size"),
                            format!("{} is smaller than any source's NVRAM can be with {} partitions ({}); set the source's nvram.size here", src.nvram_size, self.nvram.partitions, ByteSize(min)),
                        ));
                    }
                    let id = ShippingSection::link_node_id(&src.name);
                    if ids.contains(&id) {
                        return Err(invalid(f("name"), format!("{:?} has the same link id as another node here; rename one of them", src.name)));
                    }
                    ids.push(id);
                }
                let needed = self.destination_nvram_bytes();
                if let Some(size) = self.nvram.size.filter(|n| n.0 < needed) {
                    return Err(invalid(
                        "nvram.size",
                        format!("{size} cannot hold the sources' NVRAM areas ({}, the sum of their nvram_size); use at least that", ByteSize(needed)),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A destination's NVRAM: one area per source, each as large as that source's NVRAM.
    pub fn destination_nvram_bytes(&self) -> u64 {
        self.shipping.as_ref().map_or(0, |s| {
            s.sources
                .iter()
                .try_fold(0u64, |sum, x| sum.checked_add(x.nvram_size.0))
                .unwrap_or(u64::MAX)
        })
    }

    /// The smallest NVRAM that holds the metadata plus four maximum-size writes per partition.
    pub fn min_nvram_bytes(&self) -> u64 {
        crate::nvram::layout::Layout::metadata_bytes(self.nvram.partitions)
            + self.nvram.partitions as u64 * crate::nvram::layout::MIN_PARTITION_BYTES
    }

    /// Our index in the cluster's node list.
    pub fn cluster_index(&self) -> Option<u32> {
        let c = self.cluster.as_ref()?;
        c.nodes
            .iter()
            .position(|n| n.name == self.node.name)
            .map(|i| i as u32)
    }

    /// Where the metrics endpoint listens (None: off). `validate` checked the address.
    pub fn metrics_listen(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref()?.listen.parse().ok()
    }

    pub fn control_socket(&self) -> PathBuf {
        self.node
            .control_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/run/nvmirror/{}.sock", self.node.name)))
    }
}

impl LunSection {
    pub fn ranges(&self, partitions: u32) -> u32 {
        self.ranges.unwrap_or(partitions)
    }

    /// The configured owner of every range, as an index into the cluster's node list:
    /// range `i` belongs to `owners[i % owners.len()]`, or without `owners` to the nodes in
    /// turn. The one place this rule is written (the daemon's initial ownership table,
    /// `nvmirrorctl config show` and through it the Pacemaker agent all use it).
    pub fn range_owners(&self, partitions: u32, nodes: &[ClusterNode]) -> Vec<u32> {
        let n = nodes.len().max(1) as u32;
        (0..self.ranges(partitions))
            .map(|r| match &self.owners {
                Some(o) if !o.is_empty() => {
                    let name = &o[r as usize % o.len()];
                    nodes.iter().position(|x| &x.name == name).unwrap_or(0) as u32
                }
                _ => r % n,
            })
            .collect()
    }
}

/// Whether two listen addresses (valid `ip:port`) would bind the same port: the same
/// address, or the same port with either one a wildcard (0.0.0.0, [::]).
fn same_port(a: &str, b: &str) -> bool {
    match (
        a.parse::<std::net::SocketAddr>(),
        b.parse::<std::net::SocketAddr>(),
    ) {
        (Ok(a), Ok(b)) => {
            a.port() == b.port()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        }
        _ => a == b,
    }
}

/// The link heartbeat of `section` (`cluster` or `shipping`).
fn check_heartbeat(section: &str, interval_ms: u64, timeout_ms: u64) -> Result<(), ConfigError> {
    if timeout_ms > 600_000 {
        return Err(invalid(
            format!("{section}.heartbeat_timeout_ms"),
            format!("{timeout_ms} is too long; use at most 600000 (10 minutes)"),
        ));
    }
    if interval_ms == 0 || timeout_ms < 2 * interval_ms {
        return Err(invalid(
            format!("{section}.heartbeat_timeout_ms"),
            "must be at least twice heartbeat_interval_ms (and the interval above 0)",
        ));
    }
    Ok(())
}

fn valid_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} is not a valid name; use 1-63 characters from [A-Za-z0-9._-]"),
        ))
    }
}

/// The NVRAM partition a global range (ranges of all LUNs numbered in order) stages in:
/// ranges are spread over the partitions in turn.
pub fn partition_of_range(global_range: u32, partitions: usize) -> u32 {
    global_range % partitions.max(1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
name = "node-a"

[nvram]
path = "/tmp/nvram.img"
size = "64MiB"
partitions = 4

[[lun]]
name = "lun0"
medium = "/tmp/medium.img"
size = "1GiB"
device_id = 3
"#;

    #[test]
    fn the_metrics_endpoint_is_off_by_default_and_its_address_is_checked() {
        assert_eq!(
            NodeConfig::parse(GOOD).expect("valid").metrics_listen(),
            None
        );
        let on = format!("{GOOD}\n[metrics]\nlisten = \"127.0.0.1:9477\"\n");
        let c = NodeConfig::parse(&on).expect("valid");
        assert_eq!(c.metrics_listen(), Some("127.0.0.1:9477".parse().unwrap()));
        assert!(!c
            .environment_warnings()
            .iter()
            .any(|w| w.contains("metrics")));
        let bad = format!("{GOOD}\n[metrics]\nlisten = \"localhost\"\n");
        match NodeConfig::parse(&bad) {
            Err(ConfigError::Invalid { field, problem }) => {
                assert_eq!(field, "metrics.listen");
                assert!(problem.contains("127.0.0.1:9477"), "{problem}");
            }
            other => panic!("expected metrics.listen to be refused, got {other:?}"),
        }
        let open = format!("{GOOD}\n[metrics]\nlisten = \"0.0.0.0:9477\"\n");
        let c = NodeConfig::parse(&open).expect("valid");
        assert!(c
            .environment_warnings()
            .iter()
            .any(|w| w.contains("metrics.listen 0.0.0.0:9477 is not a loopback address")));
    }

    #[test]
    fn parses_a_good_config_with_defaults() {
        let c = NodeConfig::parse(GOOD).expect("valid");
        assert_eq!(c.node.name, "node-a");
        assert_eq!(c.nvram.size, Some(ByteSize(64 << 20)));
        assert_eq!(c.luns[0].size, Some(ByteSize(1 << 30)));
        assert_eq!(c.luns[0].queues, default_queues());
        assert!((1..=DEFAULT_QUEUES_MAX).contains(&c.luns[0].queues));
        assert_eq!(c.luns[0].queue_depth, 64);
        assert!(!c.luns[0].pin_queues);
        assert_eq!(c.luns[0].ranges(c.nvram.partitions), 4);
        assert_eq!(
            c.control_socket(),
            PathBuf::from("/run/nvmirror/node-a.sock")
        );
    }

    fn err_of(text: &str) -> String {
        NodeConfig::parse(text).expect_err("must fail").to_string()
    }

    #[test]
    fn bad_size_names_the_value_and_the_fix() {
        let e = err_of(&GOOD.replace("\"1GiB\"", "\"1 gigabyte\""));
        assert!(e.contains("1 gigabyte") && e.contains("GiB"), "{e}");
    }

    #[test]
    fn queue_threads_are_unpinned_unless_asked() {
        let c =
            NodeConfig::parse(&GOOD.replace("device_id = 3", "device_id = 3\npin_queues = true"))
                .expect("valid");
        assert!(c.luns[0].pin_queues);
        let e = err_of(&GOOD.replace("device_id = 3", "device_id = 3\npin_queues = \"yes\""));
        assert!(e.contains("pin_queues"), "{e}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let e = err_of(&GOOD.replace("partitions = 4", "partitons = 4"));
        assert!(e.contains("partitons"), "{e}");
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let e = err_of(&GOOD.replace("partitions = 4", "partitions = 0"));
        assert!(
            e.contains("nvram.partitions") && e.contains("1 to 256"),
            "{e}"
        );
        let e = err_of(&GOOD.replace("device_id = 3", "device_id = 3\nqueue_depth = 5000"));
        assert!(e.contains("lun[0].queue_depth"), "{e}");
        let e = err_of(&GOOD.replace("size = \"1GiB\"", "size = 1000"));
        assert!(e.contains("lun[0].size") && e.contains("4096"), "{e}");
        let e = err_of(&GOOD.replace("name = \"lun0\"", "name = \"lun 0\""));
        assert!(e.contains("lun[0].name"), "{e}");
    }

    #[test]
    fn own_storage_needs_an_arbiter_and_explicit_lun_sizes() {
        let cluster = |lun_size: &str, extra: &str| {
            format!(
                "{}\n[cluster]\nid = 1\nsecret_file = \"/tmp/s\"\n{extra}\n\
                 [[cluster.node]]\nname = \"node-a\"\naddress = \"10.0.0.1:7800\"\n\
                 [[cluster.node]]\nname = \"node-b\"\naddress = \"10.0.0.2:7800\"\n",
                GOOD.replace("size = \"1GiB\"", lun_size)
            )
        };
        let sized = "size = \"1GiB\"";
        let c = NodeConfig::parse(&cluster(sized, "")).expect("valid");
        assert_eq!(c.cluster.map(|c| c.storage), Some(StorageMode::Shared));
        let e = err_of(&cluster(sized, "storage = \"own\""));
        assert!(
            e.contains("cluster.arbiter") && e.contains("both nodes see"),
            "{e}"
        );
        let e = err_of(&cluster(sized, "arbiter = \"/dev/sdz\""));
        assert!(
            e.contains("cluster.arbiter") && e.contains("only used"),
            "{e}"
        );
        let own = "storage = \"own\"\narbiter = \"/dev/sdz\"";
        let c = NodeConfig::parse(&cluster(sized, own)).expect("valid");
        assert_eq!(c.cluster.map(|c| c.storage), Some(StorageMode::Own));
        let e = err_of(&cluster("", own));
        assert!(e.contains("lun[0].size") && e.contains("same"), "{e}");
        let e = err_of(&cluster(sized, &format!("{own}\nreservations = \"scsi3\"")));
        assert!(e.contains("cluster.reservations"), "{e}");
    }

    #[test]
    fn voters_are_an_arbiter_of_their_own_and_each_field_is_checked() {
        let config = |storage: &str, voters: &str| {
            format!(
                "{GOOD}\n[cluster]\nid = 1\nsecret_file = \"/tmp/s\"\n{storage}\n\
                 [cluster.voters]\n{voters}\n\
                 [[cluster.node]]\nname = \"node-a\"\naddress = \"10.0.0.1:7800\"\n\
                 [[cluster.node]]\nname = \"node-b\"\naddress = \"10.0.0.2:7800\"\n"
            )
        };
        let own = "storage = \"own\"";
        let good =
            "port = 7801\ntiebreaker_id = 3\ntiebreaker = [\"10.0.0.3:7481\", \"10.0.0.3:7482\"]";
        let c = NodeConfig::parse(&config(own, good)).expect("valid");
        let v = c.cluster.and_then(|c| c.voters).expect("voters");
        assert_eq!(
            v.state_file(),
            PathBuf::from("/var/lib/nvmirror/voter.state")
        );
        assert_eq!(
            v.ballot_file(),
            PathBuf::from("/var/lib/nvmirror/voter.ballot")
        );
        for (storage, voters, field, says) in [
            ("", good, "cluster.voters", "only used with storage"),
            (
                "storage = \"own\"\narbiter = \"/dev/sdz\"",
                good,
                "cluster.voters",
                "keep one",
            ),
            (
                own,
                &good.replace("7801", "7800"),
                "cluster.voters.port",
                "mirror link's port",
            ),
            (
                own,
                &good.replace("7801", "0"),
                "cluster.voters.port",
                "port number",
            ),
            (
                own,
                &good.replace("= 3", "= 2"),
                "cluster.voters.tiebreaker_id",
                "data node's id",
            ),
            (
                own,
                &good.replace(", \"10.0.0.3:7482\"", ""),
                "cluster.voters.tiebreaker",
                "one per [[cluster.node]]",
            ),
            (
                own,
                &good.replace("10.0.0.3:7482", "tb:7482"),
                "cluster.voters.tiebreaker[1]",
                "ip:port",
            ),
            (
                own,
                &format!("{good}\nstate_dir = \"voters\""),
                "cluster.voters.state_dir",
                "absolute",
            ),
        ] {
            let e = err_of(&config(storage, voters));
            assert!(e.contains(field) && e.contains(says), "{field}: {e}");
        }
    }

    #[test]
    fn local_reads_are_on_with_own_storage_unless_turned_off_and_opt_in_with_a_shared_medium() {
        let on = |extra: &str| {
            NodeConfig::parse(&two_nodes_with(extra))
                .expect("valid")
                .cluster
                .is_some_and(|c| c.local_reads_on())
        };
        let own = "storage = \"own\"\narbiter = \"/dev/sdz\"";
        assert!(on(own));
        assert!(!on(&format!("{own}\nlocal_reads = false")));
        assert!(
            !on(""),
            "with a shared medium local reads are off unless asked for"
        );
        assert!(!on("local_reads = false"));
        assert!(on("local_reads = true"));
    }

    #[test]
    fn write_priority_is_off_by_default_and_checked() {
        let cluster = |extra: &str, table: &str| {
            format!(
                "{GOOD}\n[cluster]\nid = 1\nsecret_file = \"/tmp/s\"\n{extra}\n\
                 [[cluster.node]]\nname = \"node-a\"\naddress = \"10.0.0.1:7800\"\n\
                 [[cluster.node]]\nname = \"node-b\"\naddress = \"10.0.0.2:7800\"\n{table}"
            )
        };
        let c = NodeConfig::parse(&cluster("", "")).expect("valid");
        assert!(c.cluster.is_some_and(|c| c.write_priority.is_none()));
        let c = NodeConfig::parse(&cluster("", "[cluster.write_priority]\n")).expect("valid");
        let w = c.cluster.and_then(|c| c.write_priority).expect("set");
        assert_eq!(
            (w.ask_after_forwarded, w.window_ms, w.min_hold_ms),
            (256, 1000, 5000)
        );
        let e = err_of(&cluster("", "[cluster.write_priority]\nmin_hold_ms = 0\n"));
        assert!(e.contains("cluster.write_priority.min_hold_ms"), "{e}");
        let e = err_of(&cluster(
            "takeover = \"manual\"",
            "[cluster.write_priority]\nask_after_forwarded = 8\n",
        ));
        assert!(
            e.contains("cluster.write_priority") && e.contains("Pacemaker"),
            "{e}"
        );
        let e = err_of(&cluster("", "[cluster.write_priority]\nask_after = 8\n"));
        assert!(e.contains("ask_after"), "{e}");
        assert!(!w.queue_writes && w.queue_timeout_ms == 10000);
        let c = NodeConfig::parse(&cluster(
            "",
            "[cluster.write_priority]\nqueue_writes = true\nmin_hold_ms = 100\n",
        ))
        .expect("valid");
        let w = c.cluster.and_then(|c| c.write_priority).expect("set");
        assert!(w.queue_writes && w.min_hold_ms == 100);
        let e = err_of(&cluster(
            "",
            "[cluster.write_priority]\nqueue_writes = true\nqueue_timeout_ms = 0\n",
        ));
        assert!(e.contains("cluster.write_priority.queue_timeout_ms"), "{e}");
    }

    /// A valid two-node config whose `[cluster]` section also holds `extra`.
    fn two_nodes_with(extra: &str) -> String {
        format!(
            "{GOOD}\n[cluster]\nid = 1\nsecret_file = \"/tmp/s\"\n{extra}\n\
             [[cluster.node]]\nname = \"node-a\"\naddress = \"10.0.0.1:7800\"\n\
             [[cluster.node]]\nname = \"node-b\"\naddress = \"10.0.0.2:7800\"\n"
        )
    }

    #[test]
    fn frame_macs_are_on_unless_turned_off_and_off_is_warned_about() {
        let on = NodeConfig::parse(&two_nodes_with("")).expect("valid");
        assert_eq!(on.cluster.as_ref().map(|c| c.frame_mac), Some(true));
        assert!(
            !on.environment_warnings()
                .iter()
                .any(|w| w.contains("frame_mac")),
            "{:?}",
            on.environment_warnings()
        );
        let off = NodeConfig::parse(&two_nodes_with("frame_mac = false")).expect("valid");
        assert_eq!(off.cluster.as_ref().map(|c| c.frame_mac), Some(false));
        let w = off.environment_warnings().join("\n");
        assert!(
            w.contains("cluster.frame_mac = false") && w.contains("10.0.0.2:7800"),
            "{w}"
        );
        let e = err_of(&two_nodes_with("frame_mac = \"no\""));
        assert!(e.contains("frame_mac"), "{e}");
    }

    #[test]
    fn busy_poll_is_bounded_and_defaults() {
        let c = NodeConfig::parse(&two_nodes_with("")).expect("valid");
        let busy = c.cluster.map(|c| c.busy_poll_us);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let expected = if cpus >= BUSY_POLL_MIN_CPUS {
            rdma_link::DEFAULT_BUSY_POLL_US
        } else {
            0
        };
        assert_eq!(busy, Some(expected), "{cpus} CPUs");
        let e = err_of(&two_nodes_with("busy_poll_us = 50000"));
        assert!(
            e.contains("cluster.busy_poll_us") && e.contains("0 to never poll"),
            "{e}"
        );
    }

    /// A layout whose ranges fall in fewer NVRAM partitions than there are is named, with
    /// the layout that uses them all; that layout (the examples') draws no warning.
    #[test]
    fn a_layout_that_strands_nvram_partitions_is_warned_about() {
        let two_nodes = |lun: &str| {
            format!(
                "{}{lun}\n[cluster]\nid = 1\nsecret_file = \"/tmp/s\"\n\
                 [[cluster.node]]\nname = \"node-a\"\naddress = \"10.0.0.1:7800\"\n\
                 [[cluster.node]]\nname = \"node-b\"\naddress = \"10.0.0.2:7800\"\n",
                GOOD.trim_end()
            )
        };
        let c = NodeConfig::parse(&two_nodes(
            "\nranges = 2\nowners = [\"node-a\", \"node-b\"]",
        ))
        .expect("valid");
        let w = c.stranded_nvram_warnings().join("\n");
        assert!(
            w.contains("node node-a stages its writes in 1 of its 4 NVRAM partitions")
                && w.contains("node node-b stages its writes in 1 of its 4")
                && w.contains("ranges = 8"),
            "{w}"
        );
        let spread = two_nodes(
            "\nranges = 8\nowners = [\"node-a\", \"node-a\", \"node-a\", \"node-a\", \
             \"node-b\", \"node-b\", \"node-b\", \"node-b\"]",
        );
        let c = NodeConfig::parse(&spread).expect("valid");
        assert_eq!(c.stranded_nvram_warnings(), Vec::<String>::new());
        // Alternating owners over an even number of partitions use half of each node's.
        let c = NodeConfig::parse(&two_nodes("\nranges = 8")).expect("valid");
        assert!(c.stranded_nvram_warnings()[0].contains("2 of its 4"));
        // One node: fewer ranges than partitions.
        let c = NodeConfig::parse(&format!("{}\nranges = 2\n", GOOD.trim_end())).expect("valid");
        let w = c.stranded_nvram_warnings().join("\n");
        assert!(w.contains("2 of its 4") && w.contains("lun.ranges"), "{w}");
        assert_eq!(
            NodeConfig::parse(GOOD)
                .expect("valid")
                .stranded_nvram_warnings(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn forwarded_io_rides_out_a_partner_loss_for_a_minute_unless_set() {
        let c = NodeConfig::parse(&two_nodes_with("")).expect("valid");
        assert_eq!(c.cluster.as_ref().map(|c| c.forward_wait_s), Some(60));
        let c = NodeConfig::parse(&two_nodes_with("forward_wait_s = 0")).expect("valid");
        assert_eq!(c.cluster.as_ref().map(|c| c.forward_wait_s), Some(0));
        let e = err_of(&two_nodes_with("forward_wait_s = 86400"));
        assert!(
            e.contains("cluster.forward_wait_s") && e.contains("3600"),
            "{e}"
        );
        let e = err_of(&two_nodes_with("forward_wait_s = -1"));
        assert!(e.contains("forward_wait_s"), "{e}");
    }

    #[test]
    fn huge_timings_are_refused_by_name() {
        let e = err_of(&two_nodes_with(
            "heartbeat_timeout_ms = 9223372036854775807",
        ));
        assert!(e.contains("cluster.heartbeat_timeout_ms"), "{e}");
        let e = err_of(&two_nodes_with("disk_lease_ms = 9223372036854775807"));
        assert!(e.contains("cluster.disk_lease_ms"), "{e}");
        let e = err_of(&two_nodes_with("disk_lease_ms = 500"));
        assert!(
            e.contains("cluster.disk_lease_ms") && e.contains("twice"),
            "{e}"
        );
    }

    #[test]
    fn the_watchdog_timeout_must_fire_before_a_takeover() {
        // The defaults leave room for 2 s: (2 s + 1 s) / 1.1 - 0.25 s.
        let c = NodeConfig::parse(&two_nodes_with("watchdog = \"/dev/watchdog\"")).expect("valid");
        assert_eq!(c.cluster.as_ref().map(|c| c.watchdog_timeout()), Some(2));
        let e = err_of(&two_nodes_with(
            "watchdog = \"/dev/watchdog\"\nwatchdog_timeout_s = 3",
        ));
        assert!(
            e.contains("cluster.watchdog_timeout_s") && e.contains("1 to 2 s"),
            "{e}"
        );
        let e = err_of(&two_nodes_with("watchdog_timeout_s = 2"));
        assert!(
            e.contains("cluster.watchdog_timeout_s") && e.contains("cluster.watchdog is not"),
            "{e}"
        );
        let e = err_of(&two_nodes_with(
            "watchdog = \"/dev/watchdog\"\ndisk_heartbeat_ms = 250\ndisk_lease_ms = 2000\nmedium_io_timeout_ms = 500",
        ));
        assert!(
            e.contains("cluster.watchdog") && e.contains("no room"),
            "{e}"
        );
    }

    #[test]
    fn a_node_on_auto_takeover_without_a_watchdog_is_warned_about() {
        let text = format!(
            "{GOOD}\n[cluster]\nid = 1\nsecret_file = \"/tmp/s\"\n\
             [[cluster.node]]\nname = \"node-a\"\naddress = \"10.0.0.1:7800\"\n\
             [[cluster.node]]\nname = \"node-b\"\naddress = \"10.0.0.2:7800\"\n"
        );
        let c = NodeConfig::parse(&text).expect("valid");
        let w = c.environment_warnings().join("\n");
        assert!(w.contains("cluster.watchdog is not set"), "{w}");
        let c = NodeConfig::parse(&text.replace(
            "[cluster]\nid = 1\n",
            "[cluster]\nid = 1\nwatchdog = \"/nonexistent/watchdog\"\n",
        ))
        .expect("valid");
        let w = c.environment_warnings().join("\n");
        assert!(w.contains("/nonexistent/watchdog does not exist"), "{w}");
    }

    #[test]
    fn flusher_linger_is_bounded_and_defaults() {
        let c = NodeConfig::parse(GOOD).expect("valid");
        assert_eq!(c.flusher.linger_ms, DEFAULT_FLUSH_LINGER_MS);
        let e = err_of(&format!("{GOOD}\n[flusher]\nlinger_ms = 600000\n"));
        assert!(
            e.contains("flusher.linger_ms") && e.contains("at most"),
            "{e}"
        );
    }

    #[test]
    fn too_small_nvram_says_the_minimum() {
        let e = err_of(&GOOD.replace("\"64MiB\"", "\"1MiB\""));
        assert!(e.contains("nvram.size") && e.contains("at least"), "{e}");
    }

    #[test]
    fn duplicate_luns_are_rejected() {
        let two = format!("{GOOD}\n[[lun]]\nname = \"lun0\"\nmedium = \"/tmp/m2\"\n");
        assert!(err_of(&two).contains("lun[1].name"));
    }

    #[test]
    fn missing_lun_is_explained() {
        let e = err_of("[node]\nname=\"a\"\n[nvram]\npath=\"/x\"\nlun = []\n");
        assert!(e.contains("lun"), "{e}");
    }

    const SOURCE: &str = r#"
[shipping]
role = "source"
id = 77
secret_file = "/etc/nvmirror/secret"

[shipping.destination]
name = "dest"
address = "192.168.10.9:7841"
"#;

    const DESTINATION: &str = r#"
[node]
name = "dest"

[nvram]
path = "/tmp/nvram.img"
size = "128MiB"
partitions = 4

[shipping]
role = "destination"
id = 77
secret_file = "/etc/nvmirror/secret"
dir = "/var/lib/nvmirror/shipping"

[[shipping.source]]
name = "node-a"
listen = "0.0.0.0:7841"
nvram_size = "64MiB"

[[shipping.source]]
name = "node-b"
listen = "0.0.0.0:7842"
nvram_size = "64MiB"
"#;

    #[test]
    fn log_shipping_source_and_destination_configs_parse() {
        let src = NodeConfig::parse(&format!("{GOOD}{SOURCE}")).expect("valid source");
        let s = src.shipping.as_ref().expect("shipping");
        assert_eq!(s.role, ShippingRole::Source);
        assert_eq!(s.degraded, DegradedPolicy::WriteThrough);
        let dest = NodeConfig::parse(DESTINATION).expect("valid destination");
        assert!(dest.luns.is_empty());
        assert_eq!(dest.destination_nvram_bytes(), 128 << 20);
        assert!(dest.environment_warnings().is_empty());
        assert_ne!(
            ShippingSection::link_node_id("node-a"),
            ShippingSection::link_node_id("dest")
        );
    }

    #[test]
    fn shipping_frame_macs_are_on_unless_turned_off_and_off_is_warned_about() {
        let src = NodeConfig::parse(&format!("{GOOD}{SOURCE}")).expect("valid source");
        assert_eq!(src.shipping.as_ref().map(|s| s.frame_mac), Some(true));
        let off = DESTINATION.replace("id = 77\n", "id = 77\nframe_mac = false\n");
        let dest = NodeConfig::parse(&off).expect("valid destination");
        assert_eq!(dest.shipping.as_ref().map(|s| s.frame_mac), Some(false));
        let w = dest.environment_warnings().join("\n");
        assert!(
            w.contains("shipping.frame_mac = false") && w.contains("0.0.0.0:7841, 0.0.0.0:7842"),
            "{w}"
        );
        let e = err_of(&DESTINATION.replace("id = 77\n", "id = 77\nframe_mac = 0\n"));
        assert!(e.contains("frame_mac"), "{e}");
    }

    #[test]
    fn log_shipping_mistakes_name_the_field_and_the_fix() {
        let cases: Vec<(String, &str)> = vec![
            (
                DESTINATION.replace("size = \"128MiB\"", "size = \"96MiB\""),
                "nvram.size`: 96.0 MiB cannot hold the sources' NVRAM areas (128.0 MiB",
            ),
            (
                DESTINATION.replace("0.0.0.0:7842", "0.0.0.0:7841"),
                "shipping.source[1].listen`: 0.0.0.0:7841 is used twice",
            ),
            (
                DESTINATION.replace("0.0.0.0:7842", "127.0.0.1:7841"),
                "shipping.source[1].listen`: 127.0.0.1:7841 is used twice",
            ),
            (
                DESTINATION.replace("nvram_size = \"64MiB\"", "nvram_size = 67108865"),
                "is not a multiple of 4 KiB",
            ),
            (
                DESTINATION.replace("name = \"node-b\"", "name = \"dest\""),
                "shipping.source[1].name`",
            ),
            (
                format!("{DESTINATION}\n[[lun]]\nname = \"lun0\"\nmedium = \"/tmp/m\"\n"),
                "a log-shipping destination serves no LUN",
            ),
            (
                DESTINATION.replace("dir = \"/var/lib/nvmirror/shipping\"\n", ""),
                "shipping.dir`: the destination writes each source's records to log files",
            ),
            (
                DESTINATION.replace("/var/lib/nvmirror/shipping", "logs"),
                "shipping.dir`: logs is relative",
            ),
            (
                format!("{GOOD}{}", SOURCE.replace("[shipping.destination]", "[shipping.nowhere]")),
                "nowhere",
            ),
            (
                format!("{GOOD}{}", &SOURCE[..SOURCE.find("[shipping.destination]").unwrap_or(0)]),
                "shipping.destination`: a source needs its destination",
            ),
            (
                format!("{GOOD}{}", SOURCE.replace("192.168.10.9:7841", "dest:7841")),
                "shipping.destination.address`: \"dest:7841\" is not ip:port",
            ),
            (
                format!(
                    "{GOOD}{SOURCE}\n[cluster]\nid = 1\nsecret_file = \"/s\"\n[[cluster.node]]\nname = \"node-a\"\naddress = \"127.0.0.1:1\"\n[[cluster.node]]\nname = \"node-b\"\naddress = \"127.0.0.1:2\"\n"
                ),
                "either one of a [cluster] pair or in log shipping",
            ),
        ];
        for (text, want) in cases {
            let e = err_of(&text);
            assert!(e.contains(want), "wanted {want:?} in: {e}");
        }
    }
}
