//! The metrics endpoint (`[metrics] listen`): `GET /metrics` answers with the node's state
//! for Prometheus, in the OpenMetrics text format or the classic one (see [`Format`]). Every
//! scrape takes the same snapshot as `nvmirrorctl status` plus the LUNs' latency histograms
//! and encodes it with `prometheus_client`: nothing is kept between scrapes, and the data path
//! pays only for its histograms (`io_latency`).
//!
//! One thread answers the scrapes with `tiny_http`, one at a time (a scrape takes about a
//! millisecond); nothing of it runs on the data path.

use crate::control::DaemonStatus;
use crate::io_latency::{HistogramSnapshot, IoKind};
use anyhow::Context;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::net::SocketAddr;
use std::sync::Arc;

/// One scrape's data (the collector `prometheus_client` encodes).
#[derive(Clone, Debug)]
pub struct Scrape {
    pub status: DaemonStatus,
    /// Per LUN (in the engine's order, as `status.engine.luns`): each kind's histogram.
    pub latency: Vec<Vec<(IoKind, HistogramSnapshot)>>,
}

/// Where a scrape's data comes from (the daemon: its control handler and engine).
pub type ScrapeSource = Arc<dyn Fn() -> Scrape + Send + Sync>;

/// The two text formats, chosen by the scraper's `Accept` header as Prometheus's client
/// libraries do: OpenMetrics when asked for (Prometheus asks), else the classic text format
/// 0.0.4 (curl, `promtool check metrics`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    PrometheusText,
}

impl Format {
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::PrometheusText,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::PrometheusText => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

/// Binds `addr` and serves `/metrics` on a thread of its own until the process exits.
pub fn serve(addr: SocketAddr, source: ScrapeSource) -> anyhow::Result<()> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("metrics.listen {addr}: cannot listen there"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                answer(request, &source);
            }
        })
        .context("spawning the metrics thread")?;
    tracing::info!("metrics endpoint on http://{addr}/metrics");
    Ok(())
}

fn answer(request: tiny_http::Request, source: &ScrapeSource) {
    let path = request.url().split('?').next().unwrap_or("");
    let format = Format::from_accept(
        request
            .headers()
            .iter()
            .find(|h| h.field.equiv("Accept"))
            .map(|h| h.value.as_str()),
    );
    let response = match (request.method(), path) {
        (tiny_http::Method::Get, "/metrics") => match encode(source(), format) {
            Ok(text) => {
                tiny_http::Response::from_string(text).with_header(header(format.content_type()))
            }
            Err(e) => tiny_http::Response::from_string(format!("encoding the metrics: {e}\n"))
                .with_status_code(500),
        },
        (tiny_http::Method::Get, _) => {
            tiny_http::Response::from_string("nvmirrord serves /metrics only\n")
                .with_status_code(404)
        }
        _ => tiny_http::Response::from_string("only GET\n").with_status_code(405),
    };
    if let Err(e) = request.respond(response) {
        tracing::debug!("metrics: answering a scrape: {e}");
    }
}

fn header(content_type: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes())
        .expect("a constant header is valid")
}

/// The scrape as text in `format` (every name prefixed `nvmirror_`).
pub fn encode(scrape: Scrape, format: Format) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("nvmirror");
    registry.register_collector(Box::new(scrape));
    let mut text = String::new();
    match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut text, &registry)?,
        Format::PrometheusText => {
            prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?
        }
    }
    Ok(text)
}

type Labels = Vec<(&'static str, String)>;

/// Writes one metric family: a descriptor and its samples.
struct Family<'e, 'a> {
    encoder: &'e mut DescriptorEncoder<'a>,
}

impl Family<'_, '_> {
    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        samples: impl IntoIterator<Item = (Labels, f64)>,
    ) -> std::fmt::Result {
        let mut m = self
            .encoder
            .encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
        for (labels, v) in samples {
            if labels.is_empty() {
                m.encode_gauge(&v)?;
            } else {
                m.encode_family(&labels)?.encode_gauge(&v)?;
            }
        }
        Ok(())
    }

    fn counter(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) -> std::fmt::Result {
        let mut m =
            self.encoder
                .encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
        for (labels, v) in samples {
            if labels.is_empty() {
                m.encode_counter::<Labels, _, u64>(&v, None)?;
            } else {
                m.encode_family(&labels)?
                    .encode_counter::<Labels, _, u64>(&v, None)?;
            }
        }
        Ok(())
    }
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// A family of one unlabelled sample.
fn one<T>(v: T) -> Vec<(Labels, T)> {
    vec![(Vec::new(), v)]
}

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.status;
        let e = &s.engine;
        let mut f = Family {
            encoder: &mut encoder,
        };
        f.gauge(
            "node_info",
            "The node: its name, version, log id and storage mode (shared, own, or single for one node); always 1.",
            None,
            [(
                vec![
                    ("node", e.node.clone()),
                    ("version", s.version.clone()),
                    ("log_id", e.log_id.clone()),
                    (
                        "storage",
                        if e.storage.is_empty() {
                            "single".into()
                        } else {
                            e.storage.clone()
                        },
                    ),
                ],
                1.0,
            )],
        )?;

        // Per LUN: the device's I/O as its queues saw it.
        let lun = |i: usize| e.luns.get(i).map_or_else(String::new, |l| l.name.clone());
        let kinds = || {
            self.latency.iter().enumerate().flat_map(move |(i, kinds)| {
                kinds
                    .iter()
                    .map(move |(k, h)| (vec![("lun", lun(i)), ("op", k.name().into())], h))
            })
        };
        f.counter(
            "lun_ios",
            "I/Os of the block device completed (failed ones included), per LUN and kind.",
            None,
            kinds().map(|(l, h)| (l, h.count)),
        )?;
        f.counter(
            "lun_io_errors",
            "I/Os of the block device that failed, per LUN and kind.",
            None,
            kinds().map(|(l, h)| (l, h.errors)),
        )?;
        {
            let mut m = f.encoder.encode_descriptor(
                "lun_io_latency",
                "Latency of the block device's I/O from its queue's view, per LUN and kind.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (labels, h) in kinds() {
                m.encode_family(&labels)?.encode_histogram::<Labels>(
                    h.sum_seconds,
                    h.count,
                    &h.buckets,
                    None,
                )?;
            }
        }
        let per_lun = |v: &dyn Fn(&crate::engine::LunStatus) -> u64| {
            e.luns
                .iter()
                .map(|l| (vec![("lun", l.name.clone())], v(l)))
                .collect::<Vec<_>>()
        };
        let bytes: Vec<(Labels, u64)> = e
            .luns
            .iter()
            .flat_map(|l| {
                [
                    (
                        vec![("lun", l.name.clone()), ("op", "read".into())],
                        l.bytes_read,
                    ),
                    (
                        vec![("lun", l.name.clone()), ("op", "write".into())],
                        l.bytes_written,
                    ),
                ]
            })
            .collect();
        f.counter(
            "lun_io",
            "Bytes read and written through the engine (forwarded I/O included), per LUN.",
            Some(Unit::Bytes),
            bytes,
        )?;
        f.gauge(
            "lun_staged",
            "Bytes of the LUN staged in NVRAM and not yet on the medium.",
            Some(Unit::Bytes),
            per_lun(&|l| l.staged_bytes)
                .into_iter()
                .map(|(l, v)| (l, v as f64)),
        )?;
        f.counter(
            "lun_reads_from_partner",
            "Medium reads that failed here and were served from the partner's medium.",
            None,
            per_lun(&|l| l.reads_from_partner),
        )?;
        f.counter(
            "lun_reads_leased",
            "Reads of the partner's ranges served here under its read lease (cluster.local_reads).",
            None,
            per_lun(&|l| l.reads_leased),
        )?;
        f.counter(
            "write_priority_moves",
            "Ranges moved because a node asked for them (cluster.write_priority), counted on both nodes of each move.",
            None,
            one(e.write_priority_moves),
        )?;
        f.counter(
            "writes_queued",
            "Writes to the partner's ranges that waited for the range (write_priority.queue_writes).",
            None,
            one(e.writes_queued),
        )?;
        f.counter(
            "writes_queued_then_forwarded",
            "Queued writes forwarded after all: the range did not come within queue_timeout_ms.",
            None,
            one(e.writes_queued_then_forwarded),
        )?;
        f.gauge(
            "lun_out_of_sync",
            "storage = \"own\": bytes our out-of-sync map holds, what the next resync copies.",
            Some(Unit::Bytes),
            e.luns
                .iter()
                .filter_map(|l| Some((vec![("lun", l.name.clone())], l.out_of_sync_bytes? as f64))),
        )?;

        // The NVRAM staging log, per partition.
        let part = |p: &crate::log::PartitionStatus| vec![("partition", p.partition.to_string())];
        f.gauge(
            "nvram_capacity",
            "Bytes of the partition's staging log.",
            Some(Unit::Bytes),
            e.partitions
                .iter()
                .map(|p| (part(p), p.capacity_bytes as f64)),
        )?;
        f.gauge(
            "nvram_used",
            "Bytes of the partition's staging log in use.",
            Some(Unit::Bytes),
            e.partitions.iter().map(|p| (part(p), p.used_bytes as f64)),
        )?;
        f.gauge(
            "nvram_unflushed_records",
            "Records staged in the partition and not yet on the medium.",
            None,
            e.partitions
                .iter()
                .map(|p| (part(p), p.records_unflushed as f64)),
        )?;
        f.gauge(
            "flush_lag",
            "Age of the partition's oldest record not yet on the medium.",
            Some(Unit::Seconds),
            e.partitions
                .iter()
                .map(|p| (part(p), p.flush_lag_ms as f64 / 1e3)),
        )?;
        f.gauge(
            "partition_failed",
            "1 when the partition stopped (its log refuses writes; see status).",
            None,
            e.partitions
                .iter()
                .map(|p| (part(p), flag(p.failed.is_some()))),
        )?;
        f.gauge(
            "flush_paused",
            "1 when the flusher is paused (nvmirrorctl flush pause).",
            None,
            one(flag(e.partitions.iter().any(|p| p.flush_paused))),
        )?;

        // The flusher and the medium.
        f.counter(
            "flushed",
            "Bytes the flusher wrote to the medium.",
            Some(Unit::Bytes),
            one(e.bytes_flushed),
        )?;
        f.counter(
            "flush_batches",
            "Batches the flusher wrote to the medium.",
            None,
            one(e.flush_batches),
        )?;
        f.counter(
            "medium_errors",
            "Medium writes or syncs that failed.",
            None,
            one(e.medium_errors),
        )?;
        f.counter(
            "delegated_batches",
            "Flush batches the partner wrote for us because our medium path failed.",
            None,
            one(e.delegated_batches),
        )?;

        // The mirror.
        let m = &e.mirror;
        f.gauge(
            "link_up",
            "1 when the mirror link to the partner is up.",
            None,
            one(flag(m.link_state == "up")),
        )?;
        f.gauge(
            "mirror_state",
            "The pair's state: 1 for the current one of mirroring, degraded, standalone.",
            None,
            ["mirroring", "degraded", "standalone"]
                .into_iter()
                .map(|st| (vec![("state", st.to_string())], flag(m.state == st))),
        )?;
        f.gauge(
            "link_rtt",
            "Round trip of the mirror link's heartbeat.",
            Some(Unit::Seconds),
            m.rtt_us.map(|us| (Vec::new(), us as f64 / 1e6)),
        )?;
        f.counter(
            "mirrored_records",
            "Records copied to the partner's second store.",
            None,
            one(m.mirrored_records),
        )?;
        f.counter(
            "degraded_records",
            "Writes acknowledged without a mirror copy (partner unreachable).",
            None,
            one(m.degraded_records),
        )?;
        f.gauge(
            "mirror_resync_left_records",
            "Records still being copied to the partner after it reconnected.",
            None,
            one(m.resync_left as f64),
        )?;
        if let Some(ss) = &m.second_store {
            f.gauge(
                "second_store_records",
                "The partner's records this node holds.",
                None,
                one(ss.records as f64),
            )?;
            f.gauge(
                "second_store",
                "Bytes of the partner's records this node holds.",
                Some(Unit::Bytes),
                one(ss.bytes as f64),
            )?;
            f.gauge(
                "second_store_capacity",
                "Bytes of the second store.",
                Some(Unit::Bytes),
                one(ss.capacity_bytes as f64),
            )?;
        }

        // Ownership: per range.
        let range = |r: &crate::cluster::RangeStatus| {
            vec![("lun", lun(r.lun as usize)), ("range", r.range.to_string())]
        };
        f.gauge(
            "range_epoch",
            "The range's epoch in the ownership table (its fencing token).",
            None,
            e.ranges.iter().map(|r| (range(r), r.epoch as f64)),
        )?;
        f.gauge(
            "range_owned",
            "1 when the ownership table gives the range to this node.",
            None,
            e.ranges.iter().map(|r| (range(r), flag(r.owner == e.node))),
        )?;
        f.gauge(
            "range_serving",
            "1 when this node serves the range right now.",
            None,
            e.ranges.iter().map(|r| (range(r), flag(r.serving))),
        )?;
        f.gauge(
            "range_owner_info",
            "The range's owner and state (always 1).",
            None,
            e.ranges.iter().map(|r| {
                let mut l = range(r);
                l.push(("owner", r.owner.clone()));
                l.push(("state", r.state.clone()));
                (l, 1.0)
            }),
        )?;
        f.gauge(
            "may_serve",
            "1 when this node may serve its ranges (its lease, or the partner's word).",
            None,
            one(flag(e.may_serve)),
        )?;
        if let Some(lease) = &e.lease {
            f.gauge(
                "lease_state",
                "This node's disk lease: 1 for the current one of acquiring, held, expired.",
                None,
                [
                    ("acquiring", crate::lease::LeaseState::Acquiring),
                    ("held", crate::lease::LeaseState::Held),
                    ("expired", crate::lease::LeaseState::Expired),
                ]
                .into_iter()
                .map(|(name, st)| (vec![("state", name.to_string())], flag(lease.state == st))),
            )?;
            f.gauge(
                "lease_expires_in",
                "Time until this node's lease runs out (negative: ran out that long ago).",
                Some(Unit::Seconds),
                lease.expires_in_ms.map(|ms| (Vec::new(), ms as f64 / 1e3)),
            )?;
            f.counter(
                "lease_renewals",
                "Renewals of this node's disk lease.",
                None,
                one(lease.renewals),
            )?;
            f.counter(
                "lease_failures",
                "Failed renewals of this node's disk lease.",
                None,
                one(lease.failures),
            )?;
        }

        // A cluster node (a single node forwards nothing).
        if !e.storage.is_empty() {
            f.gauge(
                "io_waiting_for_takeover",
                "I/Os to the lost partner's ranges waiting for a takeover (or its return) before they run.",
                None,
                one(e.io_waiting_for_takeover as f64),
            )?;
        }

        // Takeover: the running or last one.
        if let Some(t) = &e.takeover {
            let phase = if t.phase.starts_with("failed") {
                "failed"
            } else {
                t.phase.as_str()
            };
            f.gauge(
                "takeover_phase",
                "The running or last takeover: 1 for its phase (claiming, grace, replaying, done, failed).",
                None,
                ["claiming", "grace", "replaying", "done", "failed"]
                    .into_iter()
                    .map(|p| {
                        (
                            vec![("from", t.from.clone()), ("phase", p.to_string())],
                            flag(phase == p),
                        )
                    }),
            )?;
            f.gauge(
                "takeover_duration",
                "How long the running or last takeover has taken.",
                Some(Unit::Seconds),
                one(t.elapsed_ms as f64 / 1e3),
            )?;
            f.gauge(
                "takeover_replayed_records",
                "Records the running or last takeover replayed so far.",
                None,
                one(t.records_done as f64),
            )?;
            f.gauge(
                "takeover_records",
                "Records the running or last takeover has to replay.",
                None,
                one(t.records_total as f64),
            )?;
        }
        f.gauge(
            "start_replay_records",
            "Records replayed from the NVRAM when the daemon started.",
            None,
            one(e.replay.records as f64),
        )?;
        f.gauge(
            "start_replay_duration",
            "How long the replay at start took.",
            Some(Unit::Seconds),
            one(e.replay.millis as f64 / 1e3),
        )?;
        if let Some(w) = &s.watchdog {
            f.gauge(
                "watchdog_petting",
                "1 while the self-fence watchdog is petted (0: a medium write hung).",
                None,
                one(flag(w.petting)),
            )?;
        }
        Ok(())
    }
}

/// The latency histograms of every LUN of `engine`, for a scrape.
pub fn latency_of(engine: &crate::engine::Engine) -> Vec<Vec<(IoKind, HistogramSnapshot)>> {
    engine
        .luns()
        .iter()
        .map(|l| {
            IoKind::ALL
                .iter()
                .map(|&k| (k, l.stats.latency.of(k).snapshot()))
                .collect()
        })
        .collect()
}
