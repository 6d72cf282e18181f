//! nvmirrorctl: operate nvmirrord from a shell.
//!
//! Exit codes: 0 success, 1 the operation failed, 2 bad usage or config, 3 the daemon is not
//! running (or its socket cannot be reached).

mod config_show;
mod gen_docs;
mod health;
mod json_out;
mod serve_images;
mod shell;
mod status_facts;
mod verify_report;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use config_show::{ConfigView, RangesOf};
use nvmirror::config::{ByteSize, NodeConfig};
use nvmirror::control::{self, DaemonStatus, Request, Response};
use nvmirror::engine::{Engine, OpenMode};
use nvmirror::ownership::ArbiterPlace;
use nvmirror::state_events as events;
use status_facts::StatusFacts;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const EXIT_FAILED: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_NO_DAEMON: i32 = 3;

#[derive(Parser)]
#[command(
    version,
    long_version = nvmirror::release::long_version(),
    about = "Operate nvmirror: status, device list, flusher control, NVRAM inspection and recovery",
    after_help = "Exit codes: 0 success, 1 operation failed, 2 bad usage or config, 3 daemon not running"
)]
struct Cli {
    /// Control socket of the daemon (default: from --config, else the only one in /run/nvmirror).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// The node's config file (used to find the socket and the NVRAM).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Node, devices, NVRAM partitions, flush lag, mirror, ranges, takeover.
    #[command(after_help = STATUS_AFTER_HELP)]
    Status {
        /// Everything the daemon reports, as JSON.
        #[arg(long, conflicts_with = "shell")]
        json: bool,
        /// The facts a script acts on, as shell assignments to eval (listed below).
        #[arg(long)]
        shell: bool,
        /// With --shell: count only the ranges the config gives NODE (a [[cluster.node]]
        /// name; see `config show --ranges-of`). The config is --config, else the one the
        /// daemon runs with.
        #[arg(long, value_name = "NODE", requires = "shell")]
        ranges_of: Option<String>,
    },
    /// One verdict on the node for monitoring (a Nagios/Icinga plugin).
    ///
    /// Exit 0 OK, 1 WARNING (serving with less redundancy: partner away, flusher behind,
    /// medium errors, a takeover or resync pending), 2 CRITICAL (a stopped partition, a
    /// missing device, the lease lost, a failed takeover, or the daemon not running), 3
    /// UNKNOWN (bad usage, no answer).
    Health {
        /// The verdict and every finding as JSON ({"schema": 1, "severity", ...}).
        #[arg(long)]
        json: bool,
        /// WARNING when a partition's oldest unflushed write is this many seconds old.
        #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
        lag_warn: f64,
        /// CRITICAL from this flush lag on.
        #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
        lag_crit: f64,
        /// WARNING when a partition's NVRAM log is this full (percent).
        #[arg(long, default_value_t = 80.0, value_name = "PERCENT")]
        fill_warn: f64,
        /// CRITICAL from this fill on.
        #[arg(long, default_value_t = 95.0, value_name = "PERCENT")]
        fill_crit: f64,
    },
    /// Follow the node's state as a stream of lines, like `drbdsetup events2`.
    ///
    /// First the current state (`exists ...`, then `exists -`), then a `change`, `create` or
    /// `destroy` line whenever the node, a device, an NVRAM partition, a range (owner,
    /// epoch, state, serving), a takeover or a resync changes. The daemon pushes each change
    /// over one connection as the engine raises it, so every state shows unless it lasts
    /// less than taking one snapshot of the node (a status read). A daemon that stops shows
    /// as `destroy` lines; the stream goes on.
    Events {
        /// One JSON object per line ({"schema": 1, "unix_ms", "what", "object", "name",
        /// "fields"}).
        #[arg(long)]
        json: bool,
        /// How often the daemon also checks for what changes with time or on the other
        /// node alone (its disk lease running out, the partner no longer vouching for it),
        /// in milliseconds; every other change is pushed at once.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(20..=60_000))]
        interval_ms: u64,
        /// Stop after this many seconds (default: until interrupted).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
        timeout: Option<u64>,
        /// Print the current state and stop.
        #[arg(long)]
        now: bool,
    },
    /// ublk devices on this host (any server) and their state. With --config, only those
    /// served for that config, including those its dead daemon left behind.
    List {
        #[arg(long, conflicts_with = "ids")]
        json: bool,
        /// Only the device ids, one per line (for scripts).
        #[arg(long)]
        ids: bool,
    },
    /// Wait until the daemon answers and serves every configured LUN.
    Wait {
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=86_400))]
        timeout: u64,
    },
    /// Pause or resume moving staged writes to the medium.
    Flush {
        #[arg(value_parser = ["pause", "resume"])]
        action: String,
    },
    /// Wait until every staged write is on the medium.
    Drain {
        #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(0..=86_400))]
        timeout: u64,
    },
    /// Take over the partner's LUN ranges: claim them on the medium, replay the partner's
    /// mirrored writes, then serve them. Refused while the partner answers, unless --force.
    Takeover {
        #[arg(long)]
        force: bool,
        /// Only this range, as LUN:RANGE (e.g. lun0:1); repeatable. Default: all of the
        /// partner's ranges.
        #[arg(long = "range", value_name = "LUN:RANGE")]
        ranges: Vec<String>,
    },
    /// Give the partner back the ranges the config assigns to it (after a takeover, once the
    /// partner is back): their staged writes are flushed first.
    Giveback {
        #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(0..=86_400))]
        timeout: u64,
    },
    /// Hand this node's own configured ranges to the partner (switchover before maintenance):
    /// their staged writes are flushed first; the partner must be connected.
    Handover {
        #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(0..=86_400))]
        timeout: u64,
    },
    /// Restart the daemon of --config after a crash: it replays its NVRAM and re-attaches
    /// its QUIESCED ublk devices (ublk user recovery), then this waits until they are live.
    Recover {
        /// Where the daemon keeps its device ids (must match the crashed daemon's).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The nvmirrord binary (default: next to nvmirrorctl, else in PATH).
        #[arg(long)]
        nvmirrord: Option<PathBuf>,
        /// The daemon's log file.
        #[arg(long, default_value = "/var/log/nvmirrord.log")]
        log: PathBuf,
        #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(0..=86_400))]
        timeout: u64,
    },
    /// Check configuration files without starting anything.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// For packages: write man pages (DIR/man8) and shell completions (DIR/completions) of
    /// nvmirrorctl and nvmirrord.
    #[command(hide = true)]
    GenDocs { dir: PathBuf },
    /// For udev: print "LUN NODE" of an nvmirror device (e.g. ublkb0); fails for others.
    #[command(hide = true)]
    UdevName { device: String },
    /// Serve a LUN as a ublk device again (after `del --lun`).
    Add {
        /// The LUN's name in the config.
        #[arg(long)]
        lun: String,
    },
    /// Delete a device: `--lun NAME` asks the daemon to stop serving that LUN's device (it
    /// keeps flushing and mirroring; `add --lun` brings it back); `ID` deletes a ublk device
    /// whose daemon is gone for good (asynchronous: its pending I/O fails).
    Del {
        #[arg(required_unless_present = "lun", conflicts_with = "lun")]
        id: Option<u32>,
        #[arg(long)]
        lun: Option<String>,
    },
    /// Compare this node's medium with the partner's, block by block (crc32c per 4 KiB), for
    /// every range this node serves (`storage = "own"`; ranges the partner serves are
    /// verified there). Writes continue; a difference is confirmed with the range's I/O
    /// paused. Exit 1 if the media differ or a range could not be compared.
    Verify {
        /// Copy every difference from this node's medium (the one its reads come from) onto
        /// the partner's.
        #[arg(long)]
        repair: bool,
        /// Read at most this many MiB per second of each medium for the comparison (as
        /// DRBD's verify is throttled by its resync rate), so that the application's I/O
        /// keeps the media; unlimited without it.
        #[arg(long, value_name = "MIB_PER_S", value_parser = clap::value_parser!(u64).range(1..))]
        rate: Option<u64>,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        timeout: u64,
    },
    /// A double failure's way out (`storage = "own"`): each medium misses writes the other
    /// holds for these ranges (both marked outdated; `health` says CRITICAL), so neither can
    /// be copied onto the other. Keep THIS node's medium: its marks go, the writes it misses
    /// are lost, and the partner's medium gets it copied over when the partner returns.
    /// Only while the partner's daemon is stopped. Then `takeover --range` if the partner
    /// owns the range.
    ForceCurrent {
        /// A range to force, as LUN:RANGE (e.g. lun0:1); repeatable, at least one.
        #[arg(long = "range", value_name = "LUN:RANGE", required = true)]
        ranges: Vec<String>,
        /// Says that you accept losing the writes this node's medium misses.
        #[arg(long, required = true)]
        lose_missed_writes: bool,
    },
    /// Set how many MiB per second a resync copies at most (`storage = "own"`), 0 for no
    /// limit, until the daemon restarts (then `cluster.resync_rate_mib_s` applies again); a
    /// resync under way follows at once.
    ResyncRate {
        #[arg(value_name = "MIB_PER_S")]
        rate: u64,
    },
    /// Turn write priority that follows the writer on or off on this node until the daemon
    /// restarts (then `[cluster.write_priority]` applies again; `on` without that section uses
    /// its defaults). `queue`: on, and a write to a range the partner holds waits until the
    /// range is handed over instead of being forwarded (`queue_writes`). A range moves on
    /// request only when both nodes have it on.
    WritePriority {
        #[arg(value_enum)]
        state: WritePriorityState,
        /// With on or queue: keep a range at least this long (`min_hold_ms`) instead of the
        /// config's value.
        #[arg(long, value_name = "MS")]
        min_hold_ms: Option<u64>,
    },
    /// Read the partner's ranges from this node's medium (its own, or the shared one) and
    /// second store under the partner's read lease (on), or forward those reads (off), until
    /// the daemon restarts (then `cluster.local_reads` applies again).
    LocalReads {
        #[arg(value_enum)]
        state: OnOff,
    },
    /// ublk features the running kernel offers.
    Features,
    /// With `[cluster.voters]`: create this node's empty voter state and ballot file (in
    /// `cluster.voters.state_dir`), on its first start only (needs --config). Refused when
    /// either exists: a voter that has voted must never come back empty.
    InitVoter {
        /// For a node whose voter state is lost (its disk replaced): a copy of another
        /// voter's state file (the partner's `<voters.state_dir>/voter.state`, the
        /// tie-breaker's --state), taken while this node's daemon is down; twice, one per
        /// other voter. The new state holds each slot's highest fence and newest value of
        /// the two, and the ballot file starts above every epoch they saw. Each file names
        /// its voter: a copy of this node's own old state, or another cluster's, is refused.
        #[arg(long, value_name = "FILE")]
        seed_from: Vec<PathBuf>,
    },
    /// Look at or repair the NVRAM log (needs --config).
    Nvram {
        #[command(subcommand)]
        cmd: NvramCmd,
    },
    /// On a log-shipping destination, after source NAME died: put every record its NVRAM
    /// area holds into its log files, then apply them to its images (one per LUN,
    /// `shipping.dir`/NAME/lunN.img), which are then its volume. Refused while the source is
    /// connected, when the images lack part of its history (a gap, or a start after its
    /// first writes), and a second time, unless --force.
    Export {
        #[arg(long)]
        source: String,
        /// Each image's length at least: the source's LUN size (e.g. 64MiB).
        #[arg(long)]
        size: Option<nvmirror::config::ByteSize>,
        /// Export the images with what there is, gaps and all; or export them again.
        #[arg(long)]
        force: bool,
        /// Then serve the images here as /dev/ublkbN: start a detached nvmirrord with the
        /// config the export wrote (serve.toml; its log is serve-node.out next to it) and wait
        /// for its devices (after an export without it: `export --force --serve`). Under
        /// systemd or Pacemaker, run that config as a unit or resource instead.
        #[arg(long)]
        serve: bool,
        #[arg(long)]
        json: bool,
    },
    /// On a log-shipping destination: a consistency point of every partition of source NAME
    /// now. What its log files hold is applied, in sequence order, to its images
    /// (`shipping.dir`/NAME/lunN.img), which are synced; then the files are removed. (The
    /// destination also makes one whenever the source goes round an NVRAM partition.)
    Checkpoint {
        #[arg(long)]
        source: String,
        #[arg(long)]
        json: bool,
    },
    /// On a log-shipping destination, after `export`: give source NAME its volume back. Stop
    /// the node serving the images first (refused while its control socket answers); when
    /// the source next starts, it drains its log, copies every block of its medium that
    /// differs from the images, and ships again. Until then an exported source refuses to
    /// serve.
    ReturnImage {
        #[arg(long)]
        source: String,
    },
    /// Check a log-shipping destination's log files (read-only): each file's partition,
    /// source log, seqs, records and bytes; a damaged record is named. PATH is a source's
    /// directory (`shipping.dir`/SOURCE) or one file.
    LogFiles {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WritePriorityState {
    On,
    Off,
    /// On, with writes to the partner's ranges queued until the range is granted.
    Queue,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate FILE (syntax, every field, LUN ranges and owners); errors name the field.
    Check { file: PathBuf },
    /// Print the config as the daemon resolves it: node, cluster nodes, transport, takeover
    /// and degraded policies, NVRAM, and every LUN with its ranges and each range's
    /// configured owner (`owners` applied, defaults filled in). Errors name the field.
    #[command(after_help = CONFIG_SHOW_AFTER_HELP)]
    Show {
        /// The config file (default: --config).
        file: Option<PathBuf>,
        /// JSON for programs: {"schema": 1, "config", "node", "nvram", "flusher",
        /// "cluster", "luns": [{..., "ranges", "range_owners"}], "ranges_of"}.
        #[arg(long, conflicts_with = "shell")]
        json: bool,
        /// Shell assignments to eval (listed below), as the Pacemaker agent reads them.
        #[arg(long)]
        shell: bool,
        /// Also list the ranges the config gives NODE (a [[cluster.node]] name): one
        /// Pacemaker resource. Exit 2 if the config has no [cluster], NODE is not one of its
        /// nodes, or it gives NODE no range.
        #[arg(long, value_name = "NODE")]
        ranges_of: Option<String>,
    },
}

const CONFIG_SHOW_AFTER_HELP: &str = "\
With --shell, one NAME=value line per variable, values quoted for a POSIX shell
(eval \"$(nvmirrorctl --config FILE config show --shell)\"); every variable is always printed:
  CF_CONFIG     the config file (absolute path)
  CF_ME         this node (node.name)
  CF_SOCKET     the daemon's control socket
  CF_NODES      the cluster's nodes, space-separated (empty: single node)
  CF_PARTNER    the other node (empty: single node)
  CF_TRANSPORT  tcp or rdma (cluster.transport)
  CF_TAKEOVER   auto or manual (cluster.takeover)
  CF_DEGRADED   write-through or nvram (cluster.degraded)
  CF_VOTER_STATE   with [cluster.voters]: this node's voter state file (empty without)
  CF_VOTER_BALLOT  with [cluster.voters]: this node's ballot file (empty without)
  CF_LUNS       LUN names, space-separated
  CF_RANGES_OF  the --ranges-of node (empty without it)
  CF_NRANGES    how many ranges it has (without --ranges-of: how many in all)
  CF_RANGES     those ranges as LUN:RANGE, space-separated (the takeover --range spelling)

Exit codes: 0 success, 2 the config is unreadable or invalid, or --ranges-of has no answer";

const STATUS_AFTER_HELP: &str = "\
With --shell, one NAME=value line per variable, values quoted for a POSIX shell
(eval \"$(nvmirrorctl status --shell)\"); every variable is always printed. The range counts
are over the ranges of --ranges-of, or every range without it:
  ST_PID                the daemon's pid
  ST_NODE               its node name
  ST_RANGES_OF          the --ranges-of node (empty without it)
  ST_NRANGES            ranges counted
  ST_OWNED              of those, served here (owner this node, state local)
  ST_TAKING             of those, being taken over by this node (state taking-over)
  ST_HOLDERS            the other nodes that own some of them, space-separated
  ST_LINK_UP            1 while the partner link is up (writes are mirrored), else 0
  ST_LINK_STATE         the link: up, connecting, down, closed or none
  ST_MIRROR             mirroring, degraded or standalone
  ST_FAILED             failed partitions as \"PARTITION: reason; ...\" (empty: none)
  ST_MEDIUM_ERRORS      medium errors since the daemon started
  ST_LAST_MEDIUM_ERROR  the last of them (empty: none)
  ST_TAKEOVER_PHASE     claiming, grace, replaying, done or \"failed: why\" (empty: no takeover)
  ST_TAKEOVER_RECORDS   records that takeover replayed so far

Exit codes: 0 success, 1 failed, 2 bad usage or config (with --ranges-of: also a node with
no answer, as for config show), 3 daemon not running";

#[derive(Subcommand)]
enum NvramCmd {
    /// Show the log's identity and what each partition holds (read-only; safe while running).
    Inspect {
        #[arg(long)]
        json: bool,
    },
    /// Replay the intact records into the medium, DISCARD the rest (after a damaged record),
    /// and reformat. Only with the daemon stopped.
    Salvage,
    /// Erase the log and format it for this config. Staged writes are LOST. Daemon stopped.
    Format {
        #[arg(long)]
        force: bool,
    },
}

fn main() {
    // Die quietly on a closed pipe (`nvmirrorctl status | head`), like other shell tools.
    // SAFETY: setting a signal disposition to its default before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("nvmirrorctl: {e:#}");
            let code = match e.downcast_ref::<CtlError>() {
                Some(CtlError::NoDaemon(_)) => EXIT_NO_DAEMON,
                Some(CtlError::Usage(_)) => EXIT_USAGE,
                None => EXIT_FAILED,
            };
            std::process::exit(code);
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("{0}")]
    NoDaemon(String),
    #[error("{0}")]
    Usage(String),
}

fn load_config(cli: &Cli) -> anyhow::Result<(NodeConfig, PathBuf)> {
    let path = cli.config.clone().ok_or_else(|| {
        CtlError::Usage("this command needs --config FILE (the node's config)".into())
    })?;
    let cfg = NodeConfig::load(&path).map_err(|e| CtlError::Usage(e.to_string()))?;
    Ok((cfg, path))
}

fn socket_path(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    if cli.config.is_some() {
        return Ok(load_config(cli)?.0.control_socket());
    }
    let found: Vec<PathBuf> = std::fs::read_dir("/run/nvmirror")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    match found.len() {
        0 => Err(CtlError::NoDaemon(
            "no nvmirrord is running (no socket in /run/nvmirror); start it with `nvmirrord --config FILE`".into(),
        )
        .into()),
        1 => Ok(found[0].clone()),
        _ => Err(CtlError::Usage(format!(
            "several daemons run here ({}); choose one with --config or --socket",
            found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ))
        .into()),
    }
}

fn call(socket: &Path, req: Request, timeout: Duration) -> anyhow::Result<Response> {
    match control::call(socket, &req, timeout) {
        Ok(Response::Error { message }) => bail!("{message}"),
        Ok(r) => Ok(r),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Err(CtlError::NoDaemon(format!(
                "nvmirrord is not running ({}: {e})",
                socket.display()
            ))
            .into())
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(anyhow!(
            "permission denied on {}: nvmirrorctl must run as root",
            socket.display()
        )),
        Err(e) => Err(anyhow!("talking to nvmirrord on {}: {e}", socket.display())),
    }
}

/// The ranges `config` gives `node`; no answer is a config problem (exit 2).
fn resolve_ranges_of(config: &NodeConfig, path: &Path, node: &str) -> anyhow::Result<RangesOf> {
    RangesOf::resolve(config, &path.display().to_string(), node)
        .map_err(|e| CtlError::Usage(e.to_string()).into())
}

/// A log-shipping destination's status: per source, its link and what is held of it.
fn print_destination_status(d: &control::DestinationStatus) {
    println!(
        "node {} (log-shipping destination, nvmirrord {} pid {}, config {})",
        d.node, d.version, d.pid, d.config
    );
    for s in &d.sources {
        println!(
            "  source {}: link {}{} (listening on {}), held {} record(s), {} of {} bytes",
            s.name,
            s.link,
            s.link_error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default(),
            s.listen,
            s.held_records,
            s.held_bytes,
            s.capacity_bytes
        );
        match (s.volume.as_str(), s.volume_since_unix) {
            ("exported", Some(at)) => println!(
                "    volume EXPORTED {} s ago: served from the images; the source may not serve (nvmirrorctl return-image gives it back)",
                now_unix().saturating_sub(at)
            ),
            ("returning", Some(at)) => println!(
                "    volume RETURNING (given back {} s ago): the source takes it from the images at its next start",
                now_unix().saturating_sub(at)
            ),
            _ => {}
        }
        if let Some(e) = &s.log_error {
            println!("    log files: FAILING ({e})");
        }
        for p in &s.log_files {
            if p.points > 0 || p.unapplied_records > 0 {
                println!(
                    "    partition {}: images hold its writes through seq {} (log {}), {} consistency point(s), the last {} s ago; {} record(s) not applied yet{}",
                    p.partition,
                    p.applied_through,
                    p.image_log.as_deref().unwrap_or("-"),
                    p.points,
                    now_unix().saturating_sub(p.last_point_unix),
                    p.unapplied_records,
                    if p.unapplied_records > 0 {
                        format!(" (for {} s)", p.unapplied_for_s)
                    } else {
                        String::new()
                    }
                );
            }
            let Some(file) = &p.file else { continue };
            println!(
                "    partition {}: {file} seq {}..{} ({} bytes), {} record(s) appended since start, {} gap(s){}",
                p.partition,
                p.first_seq,
                p.next_seq.saturating_sub(1),
                p.file_bytes,
                p.appended_records,
                p.gaps,
                p.waiting_for
                    .as_ref()
                    .map(|w| format!("; {w}"))
                    .unwrap_or_default()
            );
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn status(socket: &Path) -> anyhow::Result<DaemonStatus> {
    match call(socket, Request::Status, Duration::from_secs(10))? {
        Response::Status(s) => Ok(*s),
        Response::Destination(d) => bail!(
            "{} is a log-shipping destination: it serves no LUN, so this command does not apply; `nvmirrorctl status` shows what it holds of each source",
            d.node
        ),
        other => bail!("unexpected answer: {other:?}"),
    }
}

/// `events`: prints the node's state, then its changes, until `timeout` (or at once with
/// `now`). The changes come pushed over one connection (`Request::Watch`); a daemon from
/// before that request is polled instead.
fn follow_events(
    socket: &Path,
    json: bool,
    interval_ms: u64,
    timeout: Option<u64>,
    now: bool,
) -> anyhow::Result<()> {
    let print = |events: &[events::Event]| -> anyhow::Result<()> {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for e in events {
            if json {
                let mut v = serde_json::to_value(e)?;
                v["schema"] = 1.into();
                v["unix_ms"] = unix_ms.into();
                println!("{v}");
            } else {
                println!("{}", e.render());
            }
        }
        Ok(())
    };
    let mut last = events::snapshot(&status(socket)?);
    print(&events::existing(&last))?;
    if json {
        println!(r#"{{"schema":1,"what":"exists","object":"-"}}"#);
    } else {
        println!("exists -");
    }
    if now {
        return Ok(());
    }
    let interval = Duration::from_millis(interval_ms);
    let deadline = timeout.map(|t| Instant::now() + Duration::from_secs(t));
    let left = || deadline.map_or(Duration::from_secs(3600), |d| d - Instant::now().min(d));
    let mut watch: Option<control::Watch> = None;
    let mut old_daemon = false;
    while !left().is_zero() {
        // A daemon that is gone (or not answering) has no objects: they show as destroyed,
        // and as created again when it is back.
        let current = if old_daemon {
            std::thread::sleep(interval.min(left()));
            status(socket).map(|s| events::snapshot(&s)).ok()
        } else {
            let pushed = match watch.as_mut() {
                Some(w) => w.next(left()),
                // The first status comes at once from a daemon that answers at all.
                None => control::Watch::start(socket, interval_ms).and_then(|mut w| {
                    let first = w.next(Duration::from_secs(10))?;
                    watch = Some(w);
                    first
                        .map(Some)
                        .ok_or_else(|| std::io::ErrorKind::TimedOut.into())
                }),
            };
            match pushed {
                Ok(Some(s)) => Some(events::snapshot(&s)),
                Ok(None) => continue,
                Err(e) if e.to_string().contains("unknown variant `watch`") => {
                    old_daemon = true;
                    continue;
                }
                Err(_) => {
                    watch = None;
                    std::thread::sleep(interval.min(left()));
                    None
                }
            }
        };
        let current = current.unwrap_or_default();
        print(&events::diff(&last, &current))?;
        last = current;
    }
    Ok(())
}

/// `health`: prints the verdict and returns the plugin exit code.
fn health_check(cli: &Cli) -> i32 {
    const UNKNOWN: i32 = 3;
    let Cmd::Health {
        json,
        lag_warn,
        lag_crit,
        fill_warn,
        fill_crit,
    } = &cli.cmd
    else {
        return UNKNOWN;
    };
    let limits = health::Limits {
        flush_lag_warn: *lag_warn,
        flush_lag_crit: *lag_crit,
        nvram_fill_warn: *fill_warn,
        nvram_fill_crit: *fill_crit,
    };
    match socket_path(cli).and_then(|socket| status(&socket)) {
        Ok(s) => {
            let h = health::assess(&s, &limits);
            if *json {
                match serde_json::to_string_pretty(&h) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        println!("UNKNOWN: encoding the verdict: {e}");
                        return UNKNOWN;
                    }
                }
            } else {
                print!("{}", h.render());
            }
            h.severity.exit_code()
        }
        Err(e) => match e.downcast_ref::<CtlError>() {
            Some(CtlError::NoDaemon(why)) => {
                println!("CRITICAL: {why}");
                health::Severity::Critical.exit_code()
            }
            _ => {
                println!("UNKNOWN: {e:#}");
                UNKNOWN
            }
        },
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.cmd {
        Cmd::Status {
            json,
            shell,
            ranges_of,
        } => {
            let socket = socket_path(&cli)?;
            // A config problem is reported as one (exit 2) before the daemon is asked.
            let given = match (ranges_of, cli.config.is_some()) {
                (Some(node), true) => {
                    let (cfg, path) = load_config(&cli)?;
                    Some(resolve_ranges_of(&cfg, &path, node)?)
                }
                _ => None,
            };
            let s = match call(&socket, Request::Status, Duration::from_secs(10))? {
                Response::Status(s) => *s,
                Response::Destination(d) if *json => {
                    println!("{}", json_out::versioned(&d)?);
                    return Ok(());
                }
                Response::Destination(d) if !*shell && ranges_of.is_none() => {
                    print_destination_status(&d);
                    return Ok(());
                }
                Response::Destination(_) => bail!(
                    "this daemon is a log-shipping destination: it serves no LUN or range, so only `status` and `status --json` apply"
                ),
                other => bail!("unexpected answer: {other:?}"),
            };
            if *json {
                println!("{}", json_out::versioned(&s)?);
            } else if *shell {
                let of = match (ranges_of, given) {
                    (Some(node), None) => {
                        let path = PathBuf::from(&s.config);
                        let cfg = NodeConfig::load(&path).map_err(|e| {
                            CtlError::Usage(format!(
                                "{e:#} (the config nvmirrord runs with; --config names another)"
                            ))
                        })?;
                        Some(resolve_ranges_of(&cfg, &path, node)?)
                    }
                    (_, given) => given,
                };
                print!("{}", StatusFacts::new(&s, of.as_ref()).shell_vars().render());
            } else {
                print_status(&s);
            }
        }
        Cmd::List { json, ids } => list(*json, *ids, cli.config.as_deref())?,
        Cmd::Wait { timeout } => {
            let want = load_config(&cli).ok().map(|(c, _)| c.luns.len());
            let socket = socket_path(&cli)?;
            let deadline = Instant::now() + Duration::from_secs(*timeout);
            loop {
                match status(&socket) {
                    Ok(s) if s.devices.len() >= want.unwrap_or(s.engine.luns.len()) => {
                        for d in &s.devices {
                            println!("{} {}", d.lun, d.path);
                        }
                        return Ok(());
                    }
                    Ok(_) | Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200))
                    }
                    Ok(_) => bail!("the daemon did not bring up every LUN within {timeout} s"),
                    Err(e) => return Err(e.context(format!("waited {timeout} s"))),
                }
            }
        }
        Cmd::Flush { action } => {
            let req = if action == "pause" {
                Request::FlushPause
            } else {
                Request::FlushResume
            };
            call(&socket_path(&cli)?, req, Duration::from_secs(10))?;
            println!("flusher {action}d");
        }
        Cmd::Drain { timeout } => {
            call(
                &socket_path(&cli)?,
                Request::Drain {
                    timeout_secs: *timeout,
                },
                Duration::from_secs(timeout + 10),
            )?;
            println!("all staged writes are on the medium");
        }
        Cmd::Takeover { force, ranges } => {
            let socket = socket_path(&cli)?;
            let req = Request::Takeover {
                force: *force,
                ranges: ranges.clone(),
            };
            let worker = {
                let socket = socket.clone();
                std::thread::spawn(move || call(&socket, req, Duration::from_secs(3600)))
            };
            // In a terminal, show the replay's progress while the takeover runs (indicatif
            // draws on stderr, and not at all when it is not a terminal).
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template(
                    "takeover from node {prefix}: {msg} [{bar:30}] {percent}% {binary_bytes}/{binary_total_bytes}, ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("#>."),
            );
            while !worker.is_finished() {
                std::thread::sleep(Duration::from_millis(300));
                if bar.is_hidden() {
                    continue;
                }
                if let Ok(s) = status(&socket) {
                    if let Some(t) = s.engine.takeover.filter(|t| t.phase != "done") {
                        bar.set_prefix(t.from.clone());
                        bar.set_message(t.phase.clone());
                        bar.set_length(t.bytes_total);
                        bar.set_position(t.bytes_done);
                    }
                }
            }
            bar.finish_and_clear();
            worker
                .join()
                .map_err(|_| anyhow!("the takeover request thread panicked"))??;
            let s = status(&socket)?;
            match s.engine.takeover {
                Some(t) => print_takeover(&t),
                None => println!("takeover complete: this node serves the partner's ranges"),
            }
        }
        Cmd::Verify {
            repair,
            rate,
            json,
            timeout,
        } => {
            let req = Request::Verify {
                repair: *repair,
                rate: rate.map(|mib| mib.saturating_mul(1 << 20)),
            };
            let report = match call(&socket_path(&cli)?, req, Duration::from_secs(*timeout))? {
                Response::Verified(r) => *r,
                other => bail!("unexpected answer: {other:?}"),
            };
            verify_report::print(&report, *json)?;
        }
        Cmd::ForceCurrent { ranges, .. } => {
            call(
                &socket_path(&cli)?,
                Request::ForceCurrent {
                    ranges: ranges.clone(),
                },
                Duration::from_secs(30),
            )?;
            println!(
                "this node's medium is current for {} now (the writes it missed are lost); the partner's gets it copied over when the partner returns",
                ranges.join(", ")
            );
        }
        Cmd::ResyncRate { rate } => {
            let bytes = Some(rate.saturating_mul(1 << 20)).filter(|&b| b > 0);
            call(
                &socket_path(&cli)?,
                Request::ResyncRate { rate: bytes },
                Duration::from_secs(10),
            )?;
            match bytes {
                Some(_) => println!("resync rate limit: {rate} MiB/s"),
                None => println!("resync rate limit: none"),
            }
        }
        Cmd::WritePriority { state, min_hold_ms } => {
            let on = *state != WritePriorityState::Off;
            let queue = *state == WritePriorityState::Queue;
            call(
                &socket_path(&cli)?,
                Request::WritePriority {
                    on,
                    queue,
                    min_hold_ms: *min_hold_ms,
                },
                Duration::from_secs(10),
            )?;
            println!(
                "write priority that follows the writer: {}",
                match state {
                    WritePriorityState::On => "on",
                    WritePriorityState::Off => "off",
                    WritePriorityState::Queue =>
                        "on, writes to the partner's ranges queued until granted",
                }
            );
        }
        Cmd::LocalReads { state } => {
            let on = *state == OnOff::On;
            call(
                &socket_path(&cli)?,
                Request::LocalReads { on },
                Duration::from_secs(10),
            )?;
            println!(
                "local reads of the partner's ranges: {}",
                if on { "on" } else { "off" }
            );
        }
        Cmd::Giveback { timeout } => {
            call(
                &socket_path(&cli)?,
                Request::Giveback { timeout_secs: *timeout },
                Duration::from_secs(timeout + 30),
            )?;
            println!("giveback complete: the partner serves its configured ranges again");
        }
        Cmd::Handover { timeout } => {
            call(
                &socket_path(&cli)?,
                Request::Handover {
                    timeout_secs: *timeout,
                },
                Duration::from_secs(timeout + 30),
            )?;
            println!("handover complete: the partner serves this node's ranges");
        }
        Cmd::Recover {
            state_dir,
            nvmirrord,
            log,
            timeout,
        } => recover(&cli, state_dir.as_deref(), nvmirrord.as_deref(), log, *timeout)?,
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => {
            let cfg = NodeConfig::load(file).map_err(|e| CtlError::Usage(format!("{e:#}")))?;
            println!(
                "{}: valid (node {}, {} LUN(s){})",
                file.display(),
                cfg.node.name,
                cfg.luns.len(),
                cfg.cluster
                    .as_ref()
                    .map(|c| {
                        let arbiter = match (&c.arbiter, &c.voters) {
                            (Some(a), _) => format!("arbiter {}", a.display()),
                            (None, Some(v)) => format!(
                                "arbiter: three voters (tie-breaker node {} at {})",
                                v.tiebreaker_id,
                                v.tiebreaker.join(", ")
                            ),
                            (None, None) => String::new(),
                        };
                        let own = match c.storage {
                            nvmirror::config::StorageMode::Own => format!(
                                ", each node its own medium, {arbiter}, {}",
                                if c.local_reads_on() {
                                    "the partner's ranges read here under its read lease"
                                } else {
                                    "reads of the partner's ranges forwarded"
                                }
                            ),
                            _ => String::new(),
                        };
                        format!("{}{own}", format!(", cluster {} over {:?}", c.id, c.transport).to_lowercase())
                    })
                    .unwrap_or_default()
            );
            for warning in cfg.environment_warnings() {
                eprintln!("warning: {warning}");
            }
        }
        Cmd::Config {
            cmd:
                ConfigCmd::Show {
                    file,
                    json,
                    shell,
                    ranges_of,
                },
        } => {
            let path = file.clone().or_else(|| cli.config.clone()).ok_or_else(|| {
                CtlError::Usage("config show needs the config: FILE or --config FILE".into())
            })?;
            let cfg = NodeConfig::load(&path).map_err(|e| CtlError::Usage(format!("{e:#}")))?;
            let of = match ranges_of {
                Some(node) => Some(resolve_ranges_of(&cfg, &path, node)?),
                None => None,
            };
            let view = ConfigView::new(&cfg, &path, of);
            if *json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else if *shell {
                // Nothing on stderr: scripts capture both streams and eval on success.
                print!("{}", view.shell_vars().render());
            } else {
                print!("{}", view.human());
                for warning in cfg.environment_warnings() {
                    eprintln!("warning: {warning}");
                }
            }
        }
        Cmd::UdevName { device } => {
            let id: i32 = device
                .trim_start_matches("/dev/")
                .strip_prefix("ublkb")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| CtlError::Usage(format!("{device} is not a ublk block device")))?;
            let ctrl = libublk::ctrl::UblkCtrl::new_simple(id)
                .map_err(|e| anyhow!("ublk device {id}: {e}"))?;
            let target = ctrl
                .get_target_data_from_json()
                .and_then(|v| v.get("nvmirror").cloned())
                .ok_or_else(|| anyhow!("/dev/ublkb{id} is not served by nvmirror"))?;
            let field = |k: &str| {
                target
                    .get(k)
                    .and_then(|v| v.as_str())
                    .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
                    .map(String::from)
                    .ok_or_else(|| anyhow!("/dev/ublkb{id}: no usable {k} in its target data"))
            };
            println!("{} {}", field("lun")?, field("node")?);
        }
        Cmd::Add { lun } => {
            call(
                &socket_path(&cli)?,
                Request::AddDevice { lun: lun.clone() },
                Duration::from_secs(60),
            )?;
            let s = status(&socket_path(&cli)?)?;
            match s.devices.iter().find(|d| &d.lun == lun) {
                Some(d) => println!("LUN {lun} is live on {} ({})", d.path, d.attach),
                None => println!("LUN {lun} added"),
            }
        }
        Cmd::Del { lun: Some(lun), .. } => {
            call(
                &socket_path(&cli)?,
                Request::DelDevice { lun: lun.clone() },
                Duration::from_secs(60),
            )?;
            println!("deleted the device of LUN {lun}; the daemon keeps flushing and mirroring (add --lun {lun} brings it back)");
        }
        Cmd::Del { id: None, .. } => {
            return Err(CtlError::Usage("del needs a device ID or --lun NAME".into()).into())
        }
        Cmd::Del { id: Some(id), .. } => {
            let ctrl = libublk::ctrl::UblkCtrl::new_simple(*id as i32)
                .map_err(|e| anyhow!("ublk device {id}: {e}"))?;
            // Asynchronous delete: a device whose daemon died may still be mounted or open;
            // waiting for every user to let go would hang. Pending I/O fails, users drop it.
            ctrl.del_dev_async()
                .map_err(|e| anyhow!("deleting ublk device {id}: {e}"))?;
            println!("deleted /dev/ublkb{id} (its pending I/O fails; unmount what used it)");
        }
        Cmd::Health { .. } => std::process::exit(health_check(&cli)),
        Cmd::GenDocs { dir } => {
            use clap::CommandFactory;
            let files = gen_docs::generate(Cli::command(), dir)?;
            println!("wrote {} file(s) under {}", files.len(), dir.display());
        }
        Cmd::Events {
            json,
            interval_ms,
            timeout,
            now,
        } => follow_events(&socket_path(&cli)?, *json, *interval_ms, *timeout, *now)?,
        Cmd::Features => match libublk::ctrl::UblkCtrl::get_features() {
            Some(f) => {
                println!("ublk driver features: {f:#x}");
                for (bit, name) in FEATURE_NAMES {
                    println!("  {:<28} {}", name, if f & bit != 0 { "yes" } else { "no" });
                }
            }
            None => bail!("cannot read ublk features: is ublk_drv loaded (modprobe ublk_drv) and the kernel 6.5 or newer?"),
        },
        Cmd::Export {
            source,
            size,
            force,
            serve,
            json,
        } => {
            let req = Request::Export {
                source: source.clone(),
                size: size.as_ref().map(|b| b.0),
                force: *force,
            };
            let r = match call(&socket_path(&cli)?, req, Duration::from_secs(600))? {
                Response::Exported(r) => *r,
                other => bail!("unexpected answer: {other:?}"),
            };
            // The export is done whatever serving does: its report is shown first.
            let serve_images = || match &r.serve_config {
                Some(c) => serve_images::serve_images(Path::new(c), status)
                    .context("the export is done, but serving its images failed"),
                None => Err(anyhow!(
                    "the export is done, but the destination wrote no config to serve its images with"
                )),
            };
            if *json {
                #[derive(serde::Serialize)]
                struct Exported<'a> {
                    #[serde(flatten)]
                    report: &'a nvmirror::shipping::export::ExportReport,
                    serving: Option<serve_images::ImagesNode>,
                }
                let (serving, failed) = match serve.then(serve_images).transpose() {
                    Ok(node) => (node, None),
                    Err(e) => (None, Some(e)),
                };
                let out = Exported {
                    report: &r,
                    serving,
                };
                println!("{}", json_out::versioned(&out)?);
                if let Some(e) = failed {
                    return Err(e);
                }
            } else {
                for m in &r.missing {
                    println!("MISSING (--force): {m}");
                }
                for u in &r.unacknowledged {
                    println!("in flight when the source died, never acknowledged: {u}");
                }
                for i in &r.images {
                    println!(
                        "source {} LUN {}: {} ({} bytes)",
                        r.source, i.lun, i.path, i.bytes
                    );
                }
                println!(
                    "export of {}: the last consistency point applied {} record(s) from {} log file(s); the images hold {} record(s) in all",
                    r.source, r.records, r.files, r.applied_records
                );
                if *serve {
                    let n = serve_images()?;
                    for (lun, path) in &n.devices {
                        println!("serving the image of LUN {lun} as {path}");
                    }
                    match n.pid {
                        Some(pid) => println!(
                            "the images' node runs as pid {pid} (log {}); stop it with SIGTERM, which drains it, before return-image",
                            n.log.display()
                        ),
                        None => println!("the images' node was running already"),
                    }
                } else if let Some(c) = &r.serve_config {
                    println!(
                        "serve the images as an ordinary single node: nvmirrord --config {c} (or export --force --serve)"
                    );
                }
            }
        }
        Cmd::Checkpoint { source, json } => {
            let req = Request::Checkpoint {
                source: source.clone(),
            };
            let r = match call(&socket_path(&cli)?, req, Duration::from_secs(600))? {
                Response::Checkpointed(r) => *r,
                other => bail!("unexpected answer: {other:?}"),
            };
            if *json {
                println!("{}", json_out::versioned(&r)?);
            } else {
                for p in &r.points {
                    println!(
                        "source {} partition {}: {} record(s), {} bytes from {} log file(s) applied; the images hold its writes through seq {}",
                        r.source, p.partition, p.records, p.bytes, p.files, p.applied_through
                    );
                }
                for m in &r.missing {
                    println!("the images lack: {m}");
                }
            }
        }
        Cmd::ReturnImage { source } => {
            let req = Request::ReturnImage {
                source: source.clone(),
            };
            match call(&socket_path(&cli)?, req, Duration::from_secs(30))? {
                Response::Ok => println!(
                    "the images of {source} go back to it when it next starts: it copies what differs from them onto its medium, then ships again"
                ),
                other => bail!("unexpected answer: {other:?}"),
            }
        }
        Cmd::LogFiles { path, json } => {
            let files: Vec<PathBuf> = if path.is_dir() {
                let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .collect();
                v.sort();
                v
            } else {
                vec![path.clone()]
            };
            let mut summaries = files
                .iter()
                .map(|f| nvmirror::shipping::log_file::summarize(f))
                .collect::<Result<Vec<_>, _>>()?;
            // By partition as a number (p10 after p2), then by seq.
            summaries.sort_by_key(|f| (f.partition, f.source_log_id.clone(), f.first_seq));
            if *json {
                println!(
                    "{}",
                    json_out::versioned(&serde_json::json!({ "files": summaries }))?
                );
            } else {
                for f in &summaries {
                    println!(
                        "{}: partition {} log {} seq {}..{}: {} record(s), {} wrap marker(s), {} bytes{}",
                        f.file,
                        f.partition,
                        f.source_log_id,
                        f.first_seq,
                        f.next_seq.saturating_sub(1),
                        f.records,
                        f.wrap_markers,
                        f.bytes,
                        if f.torn_bytes > 0 {
                            format!(", then {} bytes of a torn last append", f.torn_bytes)
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
        Cmd::InitVoter { seed_from } => {
            let (cfg, path) = load_config(&cli)?;
            let no_voters = || {
                CtlError::Usage(format!(
                    "{} has no [cluster.voters]: this node's arbiter is a device, which needs no voter state",
                    path.display()
                ))
            };
            let c = cfg.cluster.as_ref().ok_or_else(no_voters)?;
            let v = c.voters.as_ref().ok_or_else(no_voters)?;
            let me = cfg.cluster_index().ok_or_else(|| {
                CtlError::Usage(format!(
                    "{}: node.name is not one of the [[cluster.node]] names, so this node has no voter",
                    path.display()
                ))
            })?;
            let seeded = nvmirror::cluster::voter_arbiter::init(c, v, me, seed_from)
                .map_err(CtlError::Usage)?;
            println!(
                "created the voter state {} and the ballot file {}{}",
                v.state_file().display(),
                v.ballot_file().display(),
                seeded.map_or_else(String::new, |(slots, round)| format!(
                    ", from {} copies: {slots} slot(s), ballot round {round}",
                    seed_from.len()
                ))
            );
        }
        Cmd::Nvram { cmd } => {
            let (cfg, path) = load_config(&cli)?;
            match cmd {
                NvramCmd::Inspect { json } => {
                    let r = nvmirror::inspect::inspect(&cfg.nvram.path)
                        .with_context(|| format!("reading NVRAM {}", cfg.nvram.path.display()))?;
                    if *json {
                        println!("{}", json_out::versioned(&r)?);
                    } else {
                        print_inspect(&r);
                    }
                }
                NvramCmd::Salvage => {
                    let e = Engine::open_config(&cfg, &path.display().to_string(), OpenMode::Salvage)?;
                    let r = e.status().replay;
                    e.shutdown();
                    println!(
                        "replayed {} intact record(s) ({} bytes) into the medium{}; the NVRAM is reformatted",
                        r.records,
                        r.bytes,
                        if r.salvaged_from_corruption { " and discarded everything after the damaged record" } else { "" }
                    );
                }
                NvramCmd::Format { force } => {
                    if !force {
                        return Err(CtlError::Usage(
                            "formatting discards every staged write in the NVRAM; add --force if that is what you want".into(),
                        )
                        .into());
                    }
                    let e = Engine::open_config(&cfg, &path.display().to_string(), OpenMode::Format)?;
                    e.shutdown();
                    println!("formatted {} for node {}", cfg.nvram.path.display(), cfg.node.name);
                }
            }
        }
    }
    Ok(())
}

/// `recover`: restart the daemon of a config after a crash and wait until its devices are
/// live again (re-attached by ublk user recovery when the kernel kept them QUIESCED).
fn recover(
    cli: &Cli,
    state_dir: Option<&Path>,
    nvmirrord: Option<&Path>,
    log: &Path,
    timeout: u64,
) -> anyhow::Result<()> {
    let (cfg, cfg_path) = load_config(cli)?;
    let socket = cfg.control_socket();
    if let Ok(s) = status(&socket) {
        println!(
            "nvmirrord already runs for {} (pid {}): nothing to recover",
            cfg_path.display(),
            s.pid
        );
        return Ok(());
    }
    let bin = match nvmirrord {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()
            .ok()
            .and_then(|me| me.parent().map(|d| d.join("nvmirrord")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("nvmirrord")),
    };
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening the daemon log {}", log.display()))?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("--config").arg(&cfg_path);
    if let Some(d) = state_dir {
        cmd.arg("--state-dir").arg(d);
    }
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        // Its own process group: a Ctrl-C in this shell must not stop the daemon.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    println!(
        "started {} (pid {}) for {}; log {}",
        bin.display(),
        child.id(),
        cfg_path.display(),
        log.display()
    );
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        if let Some(rc) = child.try_wait()? {
            bail!(
                "nvmirrord exited during recovery ({rc}); see {} for why",
                log.display()
            );
        }
        if let Ok(s) = status(&socket) {
            if s.devices.len() >= cfg.luns.len() {
                for d in &s.devices {
                    println!("{} {} ({})", d.lun, d.path, d.attach);
                }
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon (pid {}) did not bring every LUN up within {timeout} s; it keeps \
                 trying; see {} and `nvmirrorctl status`",
                child.id(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

const FEATURE_NAMES: [(u64, &str); 10] = [
    (1, "SUPPORT_ZERO_COPY"),
    (2, "URING_CMD_COMP_IN_TASK"),
    (4, "NEED_GET_DATA"),
    (8, "USER_RECOVERY"),
    (16, "USER_RECOVERY_REISSUE"),
    (32, "UNPRIVILEGED_DEV"),
    (64, "CMD_IOCTL_ENCODE"),
    (128, "USER_COPY"),
    (512, "USER_RECOVERY_FAIL_IO"),
    (1024, "UPDATE_SIZE"),
];

/// `list`: every ublk device, or with `config` only those whose nvmirror target data names
/// that config file. The daemon records its config's canonical path there; the path as
/// given is compared too, in case it could not be resolved.
fn list(json: bool, ids_only: bool, config: Option<&Path>) -> anyhow::Result<()> {
    let config_names: Option<Vec<String>> = config.map(|p| {
        [
            Some(p.to_owned()),
            std::path::absolute(p).ok(),
            std::fs::canonicalize(p).ok(),
        ]
        .into_iter()
        .flatten()
        .map(|p| p.display().to_string())
        .collect()
    });
    let mut ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    let mut rows = Vec::new();
    for id in ids {
        let Ok(ctrl) = libublk::ctrl::UblkCtrl::new_simple(id as i32) else {
            continue;
        };
        let info = ctrl.dev_info();
        let state = match info.state as u32 {
            libublk::sys::UBLK_S_DEV_DEAD => "DEAD",
            libublk::sys::UBLK_S_DEV_LIVE => "LIVE",
            libublk::sys::UBLK_S_DEV_QUIESCED => "QUIESCED",
            libublk::sys::UBLK_S_DEV_FAIL_IO => "FAIL_IO",
            _ => "UNKNOWN",
        };
        let target = ctrl
            .get_target_data_from_json()
            .and_then(|v| v.get("nvmirror").cloned());
        if let Some(names) = &config_names {
            let served_for = target
                .as_ref()
                .and_then(|t| t.get("config"))
                .and_then(|c| c.as_str());
            if !served_for.is_some_and(|c| names.iter().any(|n| n == c)) {
                continue;
            }
        }
        rows.push(serde_json::json!({
            "id": id,
            "device": format!("/dev/ublkb{id}"),
            "state": state,
            "pid": info.ublksrv_pid,
            "queues": info.nr_hw_queues,
            "depth": info.queue_depth,
            "nvmirror": target,
        }));
    }
    if json {
        println!(
            "{}",
            json_out::versioned(&serde_json::json!({ "devices": rows }))?
        );
        return Ok(());
    }
    if ids_only {
        for r in &rows {
            println!("{}", r["id"]);
        }
        return Ok(());
    }
    if rows.is_empty() {
        match config {
            Some(c) => println!("no ublk devices for {}", c.display()),
            None => println!("no ublk devices"),
        }
        return Ok(());
    }
    println!(
        "{:<4} {:<14} {:<9} {:>7} {:>6} {:>5}  SERVED BY",
        "ID", "DEVICE", "STATE", "PID", "QUEUES", "DEPTH"
    );
    for r in rows {
        let served = match r["nvmirror"].as_object() {
            Some(o) => format!(
                "nvmirror node {} lun {}",
                o.get("node").and_then(|v| v.as_str()).unwrap_or("?"),
                o.get("lun").and_then(|v| v.as_str()).unwrap_or("?")
            ),
            None => "another ublk server".into(),
        };
        println!(
            "{:<4} {:<14} {:<9} {:>7} {:>6} {:>5}  {}",
            r["id"],
            r["device"].as_str().unwrap_or(""),
            r["state"].as_str().unwrap_or(""),
            r["pid"],
            r["queues"],
            r["depth"],
            served
        );
    }
    Ok(())
}

fn print_status(s: &DaemonStatus) {
    let e = &s.engine;
    println!(
        "node {}   nvmirrord {} pid {}   config {}",
        e.node, s.version, s.pid, s.config
    );
    println!(
        "nvram {} ({}), log {}   last start: replayed {} record(s) in {} ms{}",
        e.nvram_path,
        ByteSize(e.nvram_bytes),
        e.log_id,
        e.replay.records,
        e.replay.millis,
        if e.replay.discarded_unacknowledged > 0 {
            format!(
                ", dropped {} unacknowledged torn record(s)",
                e.replay.discarded_unacknowledged
            )
        } else {
            String::new()
        }
    );
    println!();
    println!(
        "{:<10} {:<14} {:<10} {:>12}  MEDIUM",
        "LUN", "DEVICE", "ATTACH", "SIZE"
    );
    for l in &e.luns {
        let dev = s.devices.iter().find(|d| d.lun == l.name);
        println!(
            "{:<10} {:<14} {:<10} {:>12}  {}",
            l.name,
            dev.map(|d| d.path.as_str()).unwrap_or("(starting)"),
            dev.map(|d| d.attach.as_str()).unwrap_or("-"),
            ByteSize(l.size).to_string(),
            l.medium
        );
    }
    println!();
    println!(
        "{:<5} {:>22} {:>9} {:>10} {:>11} {:>11}  STATE",
        "PART", "NVRAM FILL", "RECORDS", "FLUSH LAG", "ACKED", "FLUSHED"
    );
    for p in &e.partitions {
        let pct = (p.used_bytes * 100)
            .checked_div(p.capacity_bytes)
            .unwrap_or(0);
        let bar: String = (0..10)
            .map(|i| if i < pct / 10 { '#' } else { '.' })
            .collect();
        let state = match (&p.failed, p.flush_paused) {
            (Some(f), _) => format!("FAILED: {f}"),
            (None, true) => "flush paused".into(),
            (None, false) => "ok".into(),
        };
        println!(
            "{:<5} [{}] {:>3}% {:>5} {:>9} {:>8}ms {:>11} {:>11}  {}",
            p.partition,
            bar,
            pct,
            "",
            p.records_unflushed,
            p.flush_lag_ms,
            p.acked_through,
            p.flushed_through,
            state
        );
    }
    let m = &e.mirror;
    if let Some(ss) = &m.second_store {
        println!();
        let link = match (m.state.as_str(), &m.transport) {
            ("mirroring", Some(t)) => format!(
                "MIRRORING over {t}{}",
                m.rtt_us
                    .map(|us| format!(", heartbeat rtt {us} us"))
                    .unwrap_or_default()
            ),
            ("mirroring", None) => "MIRRORING".into(),
            (other, _) => format!(
                "{} (partner unreachable; new writes: {})",
                other.to_uppercase(),
                match m.degraded_policy {
                    Some(nvmirror::config::DegradedPolicy::Nvram) => "single NVRAM copy",
                    _ => "write-through to the medium",
                }
            ),
        };
        println!(
            "mirror: {link}\n        {} write(s) mirrored, {} acknowledged degraded{}",
            m.mirrored_records,
            m.degraded_records,
            m.last_error
                .as_ref()
                .map(|x| format!("; last outage: {x}"))
                .unwrap_or_default()
        );
        println!(
            "second store (partner's copies): {} record(s), {} of {}",
            ss.records,
            ByteSize(ss.bytes),
            ByteSize(ss.capacity_bytes)
        );
        if m.resync_left > 0 {
            println!(
                "resync: copying {} record(s) staged while the partner was away",
                m.resync_left
            );
        } else if m.unmirrored {
            println!("unmirrored: staged records lack their copy in the partner (flushes leave flush marks)");
        }
    }
    if let Some(sh) = &e.shipping {
        print_shipping_lag(m, sh);
    }
    if let Some(l) = &e.lease {
        println!();
        print_lease(l, e.may_serve);
        print_watchdog(s.watchdog.as_ref());
    }
    if e.write_priority {
        println!(
            "write priority: follows the writer ({} range(s) moved on request since the start)",
            e.write_priority_moves
        );
        if e.write_priority_queues {
            println!(
                "  writes to the partner's ranges wait for the range: {} queued, {} of them forwarded after all",
                e.writes_queued, e.writes_queued_then_forwarded
            );
        }
    }
    if e.storage == "own" {
        println!("storage: each node its own medium");
        if e.local_reads {
            let leased: u64 = e.luns.iter().map(|l| l.reads_leased).sum();
            println!(
                "local reads: the partner's ranges are read here under its read lease ({leased} read(s) so far)"
            );
        }
        if let Some(why) = &e.outdated_media_unread {
            println!("UNREAD: {why}");
        }
        for (node, stale) in &e.outdated_media {
            println!(
                "OUTDATED: node {node}'s medium misses writes of {} range(s) {stale:?}; it takes none of them over until a resync (which runs while the link is up) copies them",
                stale.len()
            );
        }
        for l in &e.luns {
            match l.out_of_sync_bytes {
                Some(b) if b > 0 => println!(
                    "out of sync: {} of LUN {} in this node's map (what the next resync copies from here)",
                    ByteSize(b),
                    l.name
                ),
                Some(_) => {}
                None => println!(
                    "LUN {}: no out-of-sync map in this NVRAM: a resync copies whole ranges",
                    l.name
                ),
            }
        }
        match e.resync_rate {
            Some(rate) => println!("resync rate limit: {}/s", ByteSize(rate)),
            None => println!("resync rate limit: none"),
        }
        if let Some(j) = &e.range_job {
            println!(
                "{} of {} range {}: {} of {} ({}%)",
                j.job,
                j.lun,
                j.range,
                ByteSize(j.bytes_done),
                ByteSize(j.bytes_total),
                j.bytes_done * 100 / j.bytes_total.max(1)
            );
        }
    }
    for r in &e.reservations {
        if let Some(error) = &r.error {
            println!(
                "reservation on {}: our key {}; cannot read the device's registrations: {error}",
                r.device, r.my_key
            );
            continue;
        }
        println!(
            "reservation on {}: our key {} {}; holder {} (type {}); keys {}",
            r.device,
            r.my_key,
            if r.registered {
                "registered"
            } else {
                "NOT REGISTERED (preempted: the medium refuses our writes)"
            },
            r.holder.as_deref().unwrap_or("none"),
            r.kind.map_or("-".into(), |k| k.to_string()),
            r.keys.join(", ")
        );
    }
    if let Some(note) = &e.takeover_note {
        println!("takeover: {note}");
    }
    if e.io_waiting_for_takeover > 0 {
        println!(
            "waiting: {} I/O(s) to the lost partner's ranges wait for a takeover or its return (cluster.forward_wait_s)",
            e.io_waiting_for_takeover
        );
    }
    if let Some(t) = &e.takeover {
        println!();
        print_takeover(t);
    }
    if !e.ranges.is_empty() {
        println!();
        println!(
            "{:<5} {:<6} {:<12} {:>6}  STATE",
            "LUN", "RANGE", "OWNER", "EPOCH"
        );
        for r in &e.ranges {
            println!(
                "{:<5} {:<6} {:<12} {:>6}  {}{}",
                r.lun,
                r.range,
                r.owner,
                r.epoch,
                r.state,
                if r.state == "local" && !r.serving {
                    " (not serving: see the lease)"
                } else {
                    ""
                }
            );
        }
    }
    println!();
    println!(
        "flushed {} in {} batches; medium errors {}{}",
        ByteSize(e.bytes_flushed),
        e.flush_batches,
        e.medium_errors,
        e.last_medium_error
            .as_ref()
            .map(|m| format!(" (last: {m})"))
            .unwrap_or_default()
    );
}

/// The disk lease: held or not, when it runs out, what this node makes of the others.
fn print_lease(l: &nvmirror::lease::LeaseStatus, may_serve: bool) {
    let expires = match l.expires_in_ms {
        Some(ms) if ms >= 0 => format!("expires in {:.1} s unless renewed", ms as f64 / 1000.0),
        Some(ms) => format!("ran out {:.1} s ago", -ms as f64 / 1000.0),
        None => "never renewed".into(),
    };
    let label = match l.place() {
        Some(ArbiterPlace::Device) => "disk lease (arbiter device)",
        Some(p) => p.lease(),
        None => "disk lease",
    };
    println!(
        "{label}: {} ({expires}; heartbeat every {} ms, lease {} ms, {} renewals, {} failed){}",
        format!("{:?}", l.state).to_uppercase(),
        l.renew_ms,
        l.lease_ms,
        l.renewals,
        l.failures,
        if may_serve { "" } else { "; NOT SERVING" }
    );
    if let Some(e) = &l.last_error {
        println!("            last error: {e}");
    }
    for p in &l.peers {
        println!(
            "            node {}: {} (heartbeat changed {:.1} s ago; dead after {:.1} s)",
            p.node,
            p.verdict,
            p.last_change_ms_ago as f64 / 1000.0,
            l.dead_after_ms as f64 / 1000.0
        );
    }
}

/// The self-fence: the watchdog petted while no medium write hangs, or its absence.
fn print_watchdog(w: Option<&nvmirror::watchdog::WatchdogStatus>) {
    match w {
        Some(w) if w.petting => println!(
            "watchdog: {} armed, {} s, petted {:.1} s ago",
            w.device,
            w.timeout_s,
            w.last_pet_ms_ago as f64 / 1000.0
        ),
        Some(w) => println!(
            "watchdog: {} NOT PETTED for {:.1} s (a medium write hung): this machine resets within {} s",
            w.device,
            w.last_pet_ms_ago as f64 / 1000.0,
            w.timeout_s
        ),
        None => println!(
            "watchdog: none (no self-fence if a medium write hangs; see cluster.watchdog)"
        ),
    }
}

/// Takeover line: phase, a progress bar and an ETA while replaying.
fn print_takeover(t: &nvmirror::engine::TakeoverProgress) {
    let secs = t.elapsed_ms as f64 / 1000.0;
    match t.phase.as_str() {
        "done" => println!(
            "takeover from node {}: done, {} range(s), replayed {} record(s) ({}) in {secs:.1} s",
            t.from,
            t.ranges,
            t.records_done,
            ByteSize(t.bytes_done)
        ),
        "replaying" => {
            let frac = (t.bytes_done as f64 / t.bytes_total.max(1) as f64).min(1.0);
            let bar: String = (0..30)
                .map(|i| if (i as f64) < frac * 30.0 { '#' } else { '.' })
                .collect();
            let eta = if t.bytes_done > 0 {
                format!(
                    ", ETA {:.0} s",
                    secs * (t.bytes_total.saturating_sub(t.bytes_done)) as f64 / t.bytes_done as f64
                )
            } else {
                String::new()
            };
            println!(
                "takeover from node {}: replaying [{bar}] {:.0}%  {}/{} record(s){eta}",
                t.from,
                frac * 100.0,
                t.records_done,
                t.records_total
            );
        }
        phase => println!(
            "takeover from node {}: {phase} ({} range(s), {} record(s) to replay, {secs:.1} s so far)",
            t.from, t.ranges, t.records_total
        ),
    }
}

fn print_inspect(r: &nvmirror::inspect::InspectReport) {
    println!("NVRAM {}: {}", r.path, r.state);
    if let Some(d) = &r.detail {
        println!("  {d}");
    }
    if r.state != "valid" {
        return;
    }
    println!(
        "  node {}  format v{}  log {}",
        r.node.as_deref().unwrap_or("?"),
        r.format_version.unwrap_or(0),
        r.log_id.as_deref().unwrap_or("?")
    );
    println!("  layout {}", r.layout.as_deref().unwrap_or("?"));
    for p in &r.partitions {
        println!(
            "  partition {}: {} unflushed record(s), {} bytes, seq {}..{}, first at NVRAM offset {}{}{}",
            p.partition,
            p.records,
            p.bytes,
            p.first_seq.map(|s| s.to_string()).unwrap_or("-".into()),
            p.last_seq.map(|s| s.to_string()).unwrap_or("-".into()),
            p.first_record_offset.map(|s| s.to_string()).unwrap_or("-".into()),
            if p.discarded_unacknowledged > 0 {
                format!(", {} torn unacknowledged record(s) at the tail", p.discarded_unacknowledged)
            } else {
                String::new()
            },
            p.corruption.as_ref().map(|c| format!("\n    CORRUPT: {c}")).unwrap_or_default()
        );
    }
}

/// A log-shipping source: its link to the destination and, per partition, how far the
/// destination's log files lag behind our log.
fn print_shipping_lag(
    m: &nvmirror::engine::MirrorStatus,
    sh: &nvmirror::engine::ShippingSourceStatus,
) {
    println!();
    println!(
        "destination: link {}{}; {} write(s) shipped, {} acknowledged without it{}",
        m.link_state,
        m.transport
            .as_ref()
            .map(|t| format!(" over {t}"))
            .unwrap_or_default(),
        m.mirrored_records,
        m.degraded_records,
        m.last_error
            .as_ref()
            .map(|x| format!("; last outage: {x}"))
            .unwrap_or_default()
    );
    for p in &sh.partitions {
        let confirmed = match (p.confirmed_through, p.confirmed_age_ms) {
            (Some(seq), Some(ms)) => format!("logged through seq {seq} ({ms} ms ago)"),
            _ => "nothing confirmed since start".to_owned(),
        };
        let waiting = p
            .waiting
            .as_ref()
            .map(|w| {
                format!(
                    "; batch {}..{} waits for it for {} ms ({} question(s))",
                    w.first_seq, w.through_seq, w.waiting_ms, w.asks
                )
            })
            .unwrap_or_default();
        println!(
            "  partition {}: {confirmed}; {} record(s), {} in our log not confirmed yet (oldest {} ms){waiting}",
            p.partition,
            p.unconfirmed_records,
            ByteSize(p.unconfirmed_bytes),
            p.oldest_unconfirmed_ms
        );
    }
    if m.resync_left > 0 {
        println!(
            "  sending it {} record(s) acknowledged while it was away",
            m.resync_left
        );
    }
    if sh.batches_without_destination > 0 {
        println!(
            "  {} flushed batch(es) left our log without it since start: its log files have a gap there",
            sh.batches_without_destination
        );
    }
}
