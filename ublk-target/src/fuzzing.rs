//! The bodies of the engine's fuzz targets (`fuzz/fuzz_targets/*.rs` at the repository root),
//! here so that the fuzz crate and the corpus replay in `tests/fuzz_corpus.rs` run the same
//! code. Public only for those two callers: not part of the crate's API, hidden from its
//! documentation, and nothing else may depend on it.
//!
//! Each target takes the raw fuzz input and panics only when the code under test breaks one of
//! its promises: parsing what comes from outside the process (the NVRAM, the shared medium, the
//! config file, the partner) never panics, never loops, never allocates without bound, and what
//! decodes encodes back to the same thing.
//!
//! Checksums would stop a fuzzer at the first byte it changes, so a flag in the input lets the
//! harness fix them up (as the writer computes them); inputs without the flag exercise the
//! detection of damage.

use crate::cluster::register::{RegisterMessage, RegisterVoter, Tag};
use crate::cluster::register_wire;
use crate::cluster::wire;
use crate::config::NodeConfig;
use crate::nvram::layout::{
    Layout, PartitionCheckpoint, Superblock, SuperblockState, FORMAT_VERSION, META_BLOCK,
    MIN_PARTITION_BYTES,
};
use crate::nvram::record::{RecordHeader, RecordKind, HEADER_BYTES, RECORD_ALIGN};
use crate::nvram::scan::scan_partition;
use crate::ownership::{
    self, FlushMarks, OwnershipTable, RangeOwner, TableStore, MAX_ENTRIES, MAX_MARKS, SLOT_BYTES,
};
use std::io;
use std::sync::Mutex;

/// First input byte of `nvram_records`, `nvram_scan` and `ownership_table`: recompute the
/// checksums the way the writer does before parsing.
pub const FLAG_SEAL: u8 = 0b100;
const MODE_MASK: u8 = 0b11;

/// Little-endian fields at the start of a fuzz input; zero once the input is used up, so every
/// input is a valid header.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let n = N.min(self.0.len());
        a[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        a
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

fn put_crc(b: &mut [u8], covered: usize) {
    let crc = rdma_link::checksum::crc32c(&b[..covered]);
    b[covered..covered + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The first bytes of every record header (its magic), taken from the encoder itself.
fn record_magic() -> [u8; 4] {
    let h = RecordHeader {
        kind: RecordKind::Data,
        flags: 0,
        log_id: 0,
        seq: 0,
        lun: 0,
        partition: 0,
        offset: 0,
        len: 0,
        data_len: 0,
        acked_through: 0,
        data_crc: 0,
    };
    let mut m = [0u8; 4];
    m.copy_from_slice(&h.encode()[..4]);
    m
}

/// Checksum offsets of the on-NVRAM structures (see their `encode`).
const RECORD_HEADER_CRC_AT: usize = 60;
const RECORD_DATA_CRC_AT: usize = 56;
const CHECKPOINT_CRC_AT: usize = 44;
const CHECKPOINT_BYTES: usize = 48;
const SUPERBLOCK_CRC_AT: usize = META_BLOCK as usize - 4;
const SLOT_CRC_AT: usize = SLOT_BYTES as usize - 4;

/// Fuzz target `nvram_records`: the first byte picks what the rest is (bits 0-1) and whether
/// its checksum is fixed up ([`FLAG_SEAL`]):
/// 0 a record header, 1 a superblock (zero-padded to 4 KiB), 2 a partition checkpoint,
/// 3 the geometry `Layout::compute` is asked for (`u64` length, `u32` partitions, flag byte).
pub fn nvram_records(data: &[u8]) {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let seal = head & FLAG_SEAL != 0;
    match head & MODE_MASK {
        0 => record_header(rest, seal),
        1 => superblock(rest, seal),
        2 => checkpoint(rest, seal),
        _ => layout_compute(rest),
    }
}

fn record_header(input: &[u8], seal: bool) {
    let mut b = input.to_vec();
    if seal && b.len() >= HEADER_BYTES as usize {
        put_crc(&mut b, RECORD_HEADER_CRC_AT);
    }
    if let Ok(h) = RecordHeader::decode(&b) {
        // Every field is stored as is: a header that decodes is the one that was written.
        assert_eq!(
            h.encode()[..],
            b[..HEADER_BYTES as usize],
            "record header round trip"
        );
        assert!(h.slot() >= HEADER_BYTES && h.slot() % RECORD_ALIGN == 0);
    }
}

fn superblock(input: &[u8], seal: bool) {
    // Shorter inputs stand for a block whose tail is zeroes, as a superblock's is.
    let _ = Superblock::decode(input);
    let mut b = input.to_vec();
    b.resize(b.len().max(META_BLOCK as usize), 0);
    if seal {
        put_crc(&mut b, SUPERBLOCK_CRC_AT);
    }
    let SuperblockState::Valid(sb) = Superblock::decode(&b) else {
        return;
    };
    assert_eq!(
        Superblock::decode(&sb.encode()),
        SuperblockState::Valid(sb.clone()),
        "superblock round trip"
    );
    if sb.version == FORMAT_VERSION {
        // The engine computes where everything is from a valid superblock: none of it may
        // overflow, and the checkpoints must lie before the logs.
        let l = Layout::of(&sb);
        let end = l.end();
        assert!(l.partitions > 0);
        let last_checkpoint = l.checkpoint_offset(l.partitions - 1, PartitionCheckpoint::SLOTS - 1)
            + PartitionCheckpoint::SLOT_BYTES;
        assert!(last_checkpoint <= l.data_offset);
        assert!(l.partition_base(l.partitions) <= end);
        if let Some(second) = l.second_store_offset() {
            assert_eq!(second + l.second_store_len(), end);
        }
    }
}

fn checkpoint(input: &[u8], seal: bool) {
    let mut b = input.to_vec();
    if seal && b.len() >= CHECKPOINT_BYTES {
        put_crc(&mut b, CHECKPOINT_CRC_AT);
    }
    if let Some(c) = PartitionCheckpoint::decode(&b) {
        // Bytes 40..44 are reserved (written as zeroes, not looked at): compare the fields.
        assert_eq!(
            PartitionCheckpoint::decode(&c.encode()),
            Some(c),
            "checkpoint round trip"
        );
        assert!(c.slot() < PartitionCheckpoint::SLOTS);
    }
}

fn layout_compute(input: &[u8]) {
    let mut f = Fields(input);
    let (len, partitions, mirrored) = (f.u64(), f.u32(), f.u8() & 1 != 0);
    let Some(l) = Layout::compute(len, partitions, mirrored) else {
        return;
    };
    assert!(l.end() <= len, "layout beyond the device");
    assert!(l.part_size >= MIN_PARTITION_BYTES && l.part_size % META_BLOCK == 0);
    assert_eq!(l.data_offset, Layout::metadata_bytes(partitions));
    // Whatever a format computes, a restart must accept.
    let sb = Superblock {
        version: FORMAT_VERSION,
        log_id: 1,
        created_unix: 0,
        node_name: "n".into(),
        partitions: l.partitions,
        part_size: l.part_size,
        data_offset: l.data_offset,
        second_store: u32::from(l.second_store),
        oos_offset: 0,
        layout: String::new(),
    };
    assert_eq!(
        Superblock::decode(&sb.encode()),
        SuperblockState::Valid(sb),
        "a formatted geometry is refused"
    );
}

/// Fix up the checksums of every record the log holds (a header with the record magic on a
/// 64-byte boundary), last first so a record's data checksum covers the fixed headers inside it.
fn seal_records(log: &mut [u8]) {
    let magic = record_magic();
    let align = RECORD_ALIGN as usize;
    let header = HEADER_BYTES as usize;
    let Some(last) = log.len().checked_sub(header) else {
        return;
    };
    for pos in (0..=last / align).rev().map(|i| i * align) {
        if log[pos..pos + 4] != magic {
            continue;
        }
        let data_len =
            u32::from_le_bytes([log[pos + 44], log[pos + 45], log[pos + 46], log[pos + 47]])
                as usize;
        let data = pos + header;
        if let Some(data) = log.get(data..data.saturating_add(data_len)) {
            let crc = rdma_link::checksum::crc32c(data);
            log[pos + RECORD_DATA_CRC_AT..pos + RECORD_HEADER_CRC_AT]
                .copy_from_slice(&crc.to_le_bytes());
        }
        put_crc(&mut log[pos..pos + header], RECORD_HEADER_CRC_AT);
    }
}

/// Fuzz target `nvram_scan`: a flag byte ([`FLAG_SEAL`]), the partition (`u32`), log id
/// (`u64`), start position (`u64`) and start sequence number (`u64`) of the scan, then the
/// partition log's bytes.
pub fn nvram_scan(data: &[u8]) {
    let _ = checked_scan(data);
}

/// `nvram_scan`, returning the scan's result.
fn checked_scan(data: &[u8]) -> crate::nvram::scan::ScanResult {
    let mut f = Fields(data);
    let seal = f.u8() & FLAG_SEAL != 0;
    let (partition, log_id, start_pos, start_seq) = (f.u32(), f.u64(), f.u64(), f.u64());
    let mut log = f.0.to_vec();
    if seal {
        seal_records(&mut log);
    }
    let r = scan_partition(&log, partition, log_id, start_pos, start_seq);
    let len = log.len() as u64;
    assert!(
        r.next_pos < len.max(1),
        "next position {} beyond the log",
        r.next_pos
    );
    assert!(r.used_bytes <= len, "{} bytes used of {len}", r.used_bytes);
    assert!(r.records.len() as u64 <= len / RECORD_ALIGN);
    let mut prev_seq = None;
    for rec in &r.records {
        let h = &rec.header;
        assert_ne!(
            h.kind,
            RecordKind::Wrap,
            "a wrap marker is not a record to replay"
        );
        assert_eq!((h.partition, h.log_id), (partition, log_id));
        assert!(rec.pos + h.slot() <= len, "record beyond the log");
        let data = &log[rec.data_pos() as usize..][..h.data_len as usize];
        assert_eq!(
            rdma_link::checksum::crc32c(data),
            h.data_crc,
            "record with bad data returned"
        );
        assert!(prev_seq < Some(h.seq), "records out of sequence order");
        prev_seq = Some(h.seq);
    }
    assert!(r.next_seq >= start_seq);
    if let Some(last) = prev_seq {
        assert!(last < r.next_seq);
    }
    assert!(r.max_seq_seen >= r.next_seq.saturating_sub(1));
    if let Some(c) = &r.corruption {
        assert_eq!(
            c.seq, r.next_seq,
            "the corrupt record is where the chain ends"
        );
        assert!(c.proof_seq >= c.seq);
        assert_eq!(r.discarded_tail, 0);
    }
    r
}

/// One 4 KiB slot of the ownership area from fuzz bytes: zero-padded, sealed on request.
fn table_slot(bytes: &[u8], seal: bool) -> Vec<u8> {
    let mut b = bytes[..bytes.len().min(SLOT_BYTES as usize)].to_vec();
    b.resize(SLOT_BYTES as usize, 0);
    if seal {
        put_crc(&mut b, SLOT_CRC_AT);
    }
    b
}

/// Fuzz target `ownership_table`: the first byte picks what the rest is (bits 0-1) and whether
/// slot checksums are fixed up ([`FLAG_SEAL`]):
/// 0 a table slot, 1 a flush-marks slot (both zero-padded to 4 KiB), 2 a table and marks to
/// encode (a LUN count, `u16` range counts, then bytes the entries are taken from),
/// 3 the slots of a store (two `u16` lengths cut the rest into table slots 0, 1 and marks slot
/// 2) that `load`, `load_or_init` and `load_marks` read.
pub fn ownership_table(data: &[u8]) {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let seal = head & FLAG_SEAL != 0;
    match head & MODE_MASK {
        0 => {
            if let Some(t) = OwnershipTable::decode(&table_slot(rest, seal)) {
                table_round_trip(&t);
            }
        }
        1 => {
            if let Some(m) = FlushMarks::decode(&table_slot(rest, seal)) {
                marks_round_trip(&m);
            }
        }
        2 => encode_tables(rest),
        _ => load_store(rest, seal),
    }
}

fn table_round_trip(t: &OwnershipTable) {
    match t.encode() {
        Ok(b) => assert_eq!(
            OwnershipTable::decode(&b).as_ref(),
            Some(t),
            "table round trip"
        ),
        Err(e) => panic!("a table that decodes does not encode: {e}"),
    }
}

fn marks_round_trip(m: &FlushMarks) {
    match m.encode() {
        Ok(b) => assert_eq!(FlushMarks::decode(&b).as_ref(), Some(m), "marks round trip"),
        Err(e) => panic!("flush marks that decode do not encode: {e}"),
    }
}

/// Whatever `encode` accepts must decode as itself: a table saved but unreadable would lose
/// the ownership on the next start.
fn encode_tables(input: &[u8]) {
    let mut f = Fields(input);
    let nluns = usize::from(f.u8() % 20);
    let counts: Vec<usize> = (0..nluns).map(|_| usize::from(f.u16() % 512)).collect();
    let seed = f.0;
    let word = |i: usize| -> u64 {
        if seed.is_empty() {
            return i as u64;
        }
        (0..8).fold(0u64, |w, k| {
            (w << 8) | u64::from(seed[(i * 8 + k) % seed.len()])
        })
    };
    let mut next = 0usize;
    let mut entry = || {
        next += 1;
        RangeOwner {
            owner: word(2 * next) as u32,
            epoch: word(2 * next + 1),
        }
    };
    let table = OwnershipTable {
        cluster_id: word(0),
        generation: word(1),
        luns: counts
            .iter()
            .map(|&n| (0..n.min(MAX_ENTRIES + 1)).map(|_| entry()).collect())
            .collect(),
    };
    if let Ok(b) = table.encode() {
        assert_eq!(
            OwnershipTable::decode(&b),
            Some(table),
            "encoded table unreadable"
        );
    }
    let marks = FlushMarks {
        cluster_id: word(0),
        node: word(1) as u32,
        log_id: word(2),
        flushed_through: (0..counts.iter().sum::<usize>().min(MAX_MARKS + 1))
            .map(word)
            .collect(),
        lost: (0..(word(3) % 4) as usize)
            .map(|i| crate::ownership::LostRange {
                lun: word(4 + i) as u32,
                range: (word(4 + i) >> 32) as u32,
                epoch: word(8 + i),
                partition: word(12 + i) as u32,
                flushed_through: word(16 + i),
            })
            .collect(),
        voided: (0..(word(20) % 3) as usize)
            .map(|i| crate::ownership::VoidedRange {
                lun: word(21 + i) as u32,
                range: (word(21 + i) >> 32) as u32,
                epoch: word(24 + i),
                partition: word(27 + i) as u32,
                below_seq: word(30 + i),
            })
            .collect(),
    };
    if let Ok(b) = marks.encode() {
        assert_eq!(
            FlushMarks::decode(&b),
            Some(marks),
            "encoded marks unreadable"
        );
    }
}

/// A table area held in memory, its slots taken from the fuzz input.
struct FuzzSlots(Mutex<Vec<Vec<u8>>>);

impl TableStore for FuzzSlots {
    fn read_slot(&self, slot: u64, out: &mut [u8]) -> io::Result<()> {
        let slots = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
        let src = usize::try_from(slot)
            .ok()
            .and_then(|s| slots.get(s))
            .ok_or_else(|| io::Error::other(format!("no slot {slot}")))?;
        let dst = out
            .get_mut(..src.len())
            .ok_or_else(|| io::Error::other("short read buffer"))?;
        dst.copy_from_slice(src);
        Ok(())
    }
    fn write_slot(&self, slot: u64, data: &[u8]) -> io::Result<()> {
        let mut slots = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
        let dst = usize::try_from(slot)
            .ok()
            .and_then(|s| slots.get_mut(s))
            .ok_or_else(|| io::Error::other(format!("no slot {slot}")))?;
        *dst = data.to_vec();
        Ok(())
    }
}

/// The cluster and table shape `load_or_init` is asked for in `ownership_table`.
const FUZZ_CLUSTER: u64 = 7;

fn fuzz_initial_table() -> OwnershipTable {
    OwnershipTable {
        cluster_id: FUZZ_CLUSTER,
        generation: 1,
        luns: vec![vec![
            RangeOwner { owner: 0, epoch: 1 },
            RangeOwner { owner: 1, epoch: 1 },
        ]],
    }
}

fn load_store(input: &[u8], seal: bool) {
    let mut f = Fields(input);
    let (a, b) = (usize::from(f.u16()), usize::from(f.u16()));
    let rest = f.0;
    let a = a.min(rest.len());
    let b = b.min(rest.len() - a);
    let slots = vec![
        table_slot(&rest[..a], seal),
        table_slot(&rest[a..a + b], seal),
        table_slot(&rest[a + b..], seal),
    ];
    let decoded: Vec<Option<OwnershipTable>> = slots[..2]
        .iter()
        .map(|s| OwnershipTable::decode(s))
        .collect();
    let store = FuzzSlots(Mutex::new(slots));
    match ownership::load(&store) {
        Ok(Some(t)) => {
            let newest = decoded.iter().flatten().map(|t| t.generation).max();
            assert_eq!(
                Some(t.generation),
                newest,
                "load did not pick the newest table"
            );
            assert!(decoded.iter().flatten().any(|d| d == &t));
        }
        Ok(None) => assert!(decoded.iter().all(Option::is_none), "a valid table ignored"),
        Err(e) => panic!("reading the in-memory slots failed: {e}"),
    }
    let initial = fuzz_initial_table();
    if let Ok(t) = ownership::load_or_init(&store, &initial) {
        assert_eq!(
            t.cluster_id, FUZZ_CLUSTER,
            "another cluster's table accepted"
        );
        let shape = |t: &OwnershipTable| t.luns.iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(
            shape(&t),
            shape(&initial),
            "a table of another layout accepted"
        );
        assert!(matches!(ownership::load(&store), Ok(Some(_))));
    }
    if let Ok(Some(m)) = ownership::load_marks(&store, FUZZ_CLUSTER, 0) {
        assert_eq!((m.cluster_id, m.node), (FUZZ_CLUSTER, 0));
    }
}

/// Fuzz target `config`: the input as the text of a node config file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = NodeConfig::parse(text) else {
        return;
    };
    if let Err(e) = cfg.validate() {
        panic!("a parsed config does not validate: {e}");
    }
    // What the daemon and nvmirrorctl compute from a valid config.
    let _ = cfg.min_nvram_bytes();
    let _ = cfg.control_socket();
    let nodes = cfg.cluster.as_ref().map_or(&[][..], |c| &c.nodes[..]);
    if cfg.cluster.is_some() {
        assert!(
            cfg.cluster_index().is_some(),
            "this node is not in its cluster"
        );
    }
    for lun in &cfg.luns {
        let owners = lun.range_owners(cfg.nvram.partitions, nodes);
        assert_eq!(owners.len(), lun.ranges(cfg.nvram.partitions) as usize);
        assert!(owners.iter().all(|&o| (o as usize) < nodes.len().max(1)));
    }
    // A config written back out (TOML cannot hold every u64: then there is nothing to check)
    // reads back the same.
    if let Ok(again) = toml::to_string(&cfg) {
        match NodeConfig::parse(&again) {
            Ok(back) => assert_eq!(format!("{back:?}"), format!("{cfg:?}"), "config round trip"),
            Err(e) => panic!("a config written back out does not parse: {e}\n{again}"),
        }
    }
}

/// Fuzz target `forward_wire`: the input as a forwarded request, and as its answer.
pub fn forward_wire(data: &[u8]) {
    if let Some(r) = wire::decode(data) {
        assert_eq!(
            wire::encode(r.op, r.lun, r.offset, r.len, &r.data),
            data,
            "forwarded request round trip"
        );
        if r.op == wire::OP_SHIP_LOGGED {
            let asked = wire::ShipLogged::of(&r).expect("a log question decode accepted");
            assert_eq!(asked.encode(), data, "log question round trip");
        }
        if r.op == wire::OP_SHIP_RETURNED {
            let returned = wire::ShipReturned::of(&r).expect("a return decode accepted");
            assert_eq!(returned.encode(), data, "return round trip");
        }
    }
    if let Some(state) = data.get(1..).and_then(wire::ShipState::decode) {
        assert_eq!(&state.encode()[..], &data[1..], "volume state round trip");
    }
    match wire::answer(data) {
        Ok(payload) => assert_eq!(wire::ok(payload), data, "answer round trip"),
        Err(message) => {
            if data.first() == Some(&1) && std::str::from_utf8(&data[1..]).is_ok() {
                assert_eq!(wire::err(&message), data, "error answer round trip");
            }
        }
    }
}

/// Fuzz target `register_wire`: byte 0 holds flags, the rest is decoded as a message of the
/// epoch-fenced register and as a voter's stored state (with [`FLAG_SEAL`], the harness
/// appends the state's crc32c first, as an honest writer does). What decodes must encode back
/// to the same bytes, and a voter loaded from it must answer a request.
pub fn register_wire(data: &[u8]) {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    if let Ok(m) = register_wire::decode_message(body) {
        assert_eq!(
            register_wire::encode_message(&m),
            body,
            "register message round trip"
        );
    }
    let mut state = body.to_vec();
    if flags & FLAG_SEAL != 0 {
        let crc = rdma_link::checksum::crc32c(&state);
        state.extend_from_slice(&crc.to_le_bytes());
    }
    if let Ok(mut v) = register_wire::decode_voter(&state) {
        assert_eq!(
            register_wire::encode_voter(&v),
            state,
            "voter state round trip"
        );
        let prepare = RegisterMessage::Prepare {
            from: 0,
            op: 1,
            slot: 0,
            epoch: u64::MAX,
        };
        v.state.answer(0, &prepare, Default::default());
    }
}

/// Inputs that reach the end of each path, for the seed corpora (`tests/fuzz_corpus.rs`
/// writes them; the config seeds are the files in `examples/`).
pub mod seeds {
    use super::*;

    fn record(kind: RecordKind, seq: u64, data: &[u8]) -> RecordHeader {
        RecordHeader {
            kind,
            flags: 0,
            log_id: SEED_LOG_ID,
            seq,
            lun: 0,
            partition: SEED_PARTITION,
            offset: seq * 4096,
            len: if kind == RecordKind::Wrap { 0 } else { 4096 },
            data_len: data.len() as u32,
            acked_through: seq.saturating_sub(1),
            data_crc: rdma_link::checksum::crc32c(data),
        }
    }

    const SEED_LOG_ID: u64 = 0x5eed;
    const SEED_PARTITION: u32 = 1;

    /// Seeds of `nvram_records`, by name.
    pub fn nvram_records() -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for (name, kind, data) in [
            ("data", RecordKind::Data, &[7u8; 100][..]),
            ("zero", RecordKind::Zero, &[][..]),
            ("wrap", RecordKind::Wrap, &[][..]),
        ] {
            let mut b = vec![0];
            b.extend_from_slice(&record(kind, 3, data).encode());
            out.push((format!("record-{name}"), b));
        }
        if let Some(l) = Layout::compute(64 << 20, 4, true) {
            let sb = Superblock {
                version: FORMAT_VERSION,
                log_id: SEED_LOG_ID,
                created_unix: 1_700_000_000,
                node_name: "node-a".into(),
                partitions: l.partitions,
                part_size: l.part_size,
                data_offset: l.data_offset,
                second_store: 1,
                layout: "partitions=4;mirrored;lun0:1073741824:4".into(),
                oos_offset: 0,
            };
            let mut b = vec![1];
            let encoded = sb.encode();
            // The zero tail is implied (see `superblock`).
            let used = encoded[..SUPERBLOCK_CRC_AT]
                .iter()
                .rposition(|&x| x != 0)
                .map_or(0, |i| i + 1);
            b.extend_from_slice(&encoded[..used]);
            b[0] |= FLAG_SEAL;
            out.push(("superblock-sealed".into(), b));
            let mut whole = vec![1];
            whole.extend_from_slice(&encoded);
            out.push(("superblock".into(), whole));
        }
        let cp = PartitionCheckpoint {
            partition: 2,
            log_id: SEED_LOG_ID,
            generation: 5,
            tail_off: 8192,
            tail_seq: 40,
        };
        let mut b = vec![2];
        b.extend_from_slice(&cp.encode());
        out.push(("checkpoint".into(), b));
        let mut b = vec![3];
        b.extend_from_slice(&(64u64 << 20).to_le_bytes());
        b.extend_from_slice(&4u32.to_le_bytes());
        b.push(1);
        out.push(("layout-compute".into(), b));
        out
    }

    /// Seeds of `nvram_scan`, by name: a log with a wrap, and one with a torn tail.
    pub fn nvram_scan() -> Vec<(String, Vec<u8>)> {
        let slot = |n: usize| RecordHeader::slot_bytes(n as u64) as usize;
        let head = |start_pos: u64, start_seq: u64| {
            let mut b = vec![0];
            b.extend_from_slice(&SEED_PARTITION.to_le_bytes());
            b.extend_from_slice(&SEED_LOG_ID.to_le_bytes());
            b.extend_from_slice(&start_pos.to_le_bytes());
            b.extend_from_slice(&start_seq.to_le_bytes());
            b
        };
        let put = |log: &mut Vec<u8>, at: usize, h: &RecordHeader, data: &[u8]| {
            log[at..at + HEADER_BYTES as usize].copy_from_slice(&h.encode());
            log[at + HEADER_BYTES as usize..][..data.len()].copy_from_slice(data);
        };
        // 2 KiB log: seq 5 at 1024, seq 6 at 1536, a wrap (7) at 1600, seq 8 at 0.
        let mut wrapped = vec![0u8; 2048];
        let d = [0x11u8; 400];
        put(&mut wrapped, 1024, &record(RecordKind::Data, 5, &d), &d);
        put(
            &mut wrapped,
            1024 + slot(400),
            &record(RecordKind::Zero, 6, &[]),
            &[],
        );
        put(&mut wrapped, 1600, &record(RecordKind::Wrap, 7, &[]), &[]);
        put(
            &mut wrapped,
            0,
            &record(RecordKind::Data, 8, &d[..64]),
            &d[..64],
        );
        let mut a = head(1024, 5);
        a.extend_from_slice(&wrapped);
        // 1 KiB log: seq 1, seq 2 damaged, seq 3 says only 1 was acknowledged (a torn tail).
        let mut torn = vec![0u8; 1024];
        let d = [0x22u8; 100];
        put(&mut torn, 0, &record(RecordKind::Data, 1, &d), &d);
        let mut second = record(RecordKind::Data, 2, &d);
        second.acked_through = 1;
        put(&mut torn, slot(100), &second, &d);
        torn[slot(100) + 70] ^= 1;
        let mut third = record(RecordKind::Data, 3, &d);
        third.acked_through = 1;
        put(&mut torn, 2 * slot(100), &third, &d);
        let mut b = head(0, 1);
        b.extend_from_slice(&torn);
        vec![("wrapped".into(), a), ("torn-tail".into(), b)]
    }

    /// Seeds of `ownership_table`, by name.
    pub fn ownership_table() -> Vec<(String, Vec<u8>)> {
        let trim = |b: Vec<u8>| {
            let used = b[..SLOT_CRC_AT]
                .iter()
                .rposition(|&x| x != 0)
                .map_or(0, |i| i + 1);
            b[..used].to_vec()
        };
        let mut out = Vec::new();
        let mut t = fuzz_initial_table();
        if let Ok(b) = t.encode() {
            let mut s = vec![FLAG_SEAL];
            s.extend_from_slice(&trim(b));
            out.push(("table".into(), s));
        }
        let marks = FlushMarks {
            cluster_id: FUZZ_CLUSTER,
            node: 0,
            log_id: SEED_LOG_ID,
            flushed_through: vec![3, 0, 9, 12],
            lost: vec![crate::ownership::LostRange {
                lun: 0,
                range: 1,
                epoch: 2,
                partition: 1,
                flushed_through: 0,
            }],
            voided: vec![crate::ownership::VoidedRange {
                lun: 0,
                range: 2,
                epoch: 3,
                partition: 0,
                below_seq: 7,
            }],
        };
        if let Ok(b) = marks.encode() {
            let mut s = vec![1 | FLAG_SEAL];
            s.extend_from_slice(&trim(b));
            out.push(("marks".into(), s));
        }
        let mut s = vec![2, 2];
        s.extend_from_slice(&3u16.to_le_bytes());
        s.extend_from_slice(&5u16.to_le_bytes());
        s.extend_from_slice(b"entries");
        out.push(("encode".into(), s));
        // A store with generation 1 in slot 1, generation 2 in slot 0, and flush marks.
        let first = t.encode().map(trim).unwrap_or_default();
        t.generation = 2;
        t.luns[0][1] = RangeOwner { owner: 0, epoch: 2 };
        let second = t.encode().map(trim).unwrap_or_default();
        let third = marks.encode().map(trim).unwrap_or_default();
        let mut s = vec![3 | FLAG_SEAL];
        s.extend_from_slice(&(second.len() as u16).to_le_bytes());
        s.extend_from_slice(&(first.len() as u16).to_le_bytes());
        s.extend_from_slice(&second);
        s.extend_from_slice(&first);
        s.extend_from_slice(&third);
        out.push(("store".into(), s));
        out
    }

    /// Seeds of `register_wire`, by name: one message of each kind and a voter's state.
    pub fn register_wire() -> Vec<(String, Vec<u8>)> {
        let tag = Tag {
            epoch: 7,
            counter: 2,
        };
        let messages = [
            (
                "read",
                RegisterMessage::Read {
                    from: 1,
                    op: 3,
                    slot: 2,
                    epoch: 7,
                },
            ),
            (
                "prepare",
                RegisterMessage::Prepare {
                    from: 1,
                    op: 4,
                    slot: 2,
                    epoch: 7,
                },
            ),
            (
                "write",
                RegisterMessage::Write {
                    from: 1,
                    op: 4,
                    slot: 2,
                    tag,
                    data: b"table".to_vec(),
                },
            ),
            (
                "value",
                RegisterMessage::Value {
                    from: 2,
                    op: 3,
                    epoch: 7,
                    tag,
                    data: b"table".to_vec(),
                },
            ),
            (
                "stored",
                RegisterMessage::Stored {
                    from: 2,
                    op: 4,
                    epoch: 7,
                },
            ),
            (
                "refused",
                RegisterMessage::Refused {
                    from: 0,
                    op: 5,
                    epoch: 7,
                    fence: 9,
                },
            ),
        ];
        let mut out: Vec<(String, Vec<u8>)> = messages
            .iter()
            .map(|(name, m)| {
                let mut b = vec![0];
                b.extend(register_wire::encode_message(m));
                (name.to_string(), b)
            })
            .collect();
        let voter = RegisterVoter::from_slots([
            (0, 7, tag, b"table".to_vec()),
            (5, 3, Tag::default(), Vec::new()),
        ]);
        // Version 1 (no voter named) and version 2 (its cluster and node).
        for (name, identity) in [
            ("voter-state", None),
            (
                "voter-state-named",
                Some(register_wire::VoterIdentity {
                    cluster: 0x5eed,
                    node: 3,
                }),
            ),
        ] {
            let state = register_wire::encode_voter(&register_wire::StoredVoter {
                identity,
                state: voter.clone(),
            });
            let mut sealed = vec![FLAG_SEAL];
            sealed.extend_from_slice(&state[..state.len() - 4]);
            out.push((name.into(), sealed));
            let mut whole = vec![0];
            whole.extend(state);
            out.push((format!("{name}-with-crc"), whole));
        }
        out
    }

    /// Seeds of `forward_wire`, by name.
    pub fn forward_wire() -> Vec<(String, Vec<u8>)> {
        vec![
            (
                "write".into(),
                wire::encode(wire::OP_WRITE, 0, 8192, 5, b"hello"),
            ),
            ("zero".into(), wire::encode(wire::OP_ZERO, 1, 0, 4096, &[])),
            (
                "read".into(),
                wire::encode(wire::OP_READ, 0, 4096, 512, &[]),
            ),
            (
                "write-for-partner".into(),
                wire::encode(wire::OP_WRITE_FOR_PARTNER, 2, 10, 3, &12u64.to_le_bytes()),
            ),
            (
                "reload-ownership".into(),
                wire::encode(wire::OP_RELOAD_OWNERSHIP, 0, 0, 0, &[]),
            ),
            (
                "ship-logged".into(),
                wire::ShipLogged {
                    partition: 1,
                    through_seq: 90,
                    log_id: SEED_LOG_ID,
                    first_seq: 60,
                    wraps: vec![77],
                }
                .encode(),
            ),
            ("answer-ok".into(), wire::ok(b"data")),
            ("answer-err".into(), wire::err("range not owned here")),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(all: Vec<(String, Vec<u8>)>, name: &str) -> Vec<u8> {
        match all.into_iter().find(|(n, _)| n == name) {
            Some((_, b)) => b,
            None => panic!("no seed {name}"),
        }
    }

    /// The seeds reach the end of their paths, so the fuzzer starts from deep inputs.
    #[test]
    fn scan_seeds_find_their_records() {
        let r = checked_scan(&seed(seeds::nvram_scan(), "wrapped"));
        let seqs: Vec<u64> = r.records.iter().map(|r| r.header.seq).collect();
        assert_eq!(seqs, vec![5, 6, 8]);
        let r = checked_scan(&seed(seeds::nvram_scan(), "torn-tail"));
        assert_eq!((r.records.len(), r.corruption.is_none()), (1, true));
        assert!(r.discarded_tail > 0);
    }

    #[test]
    fn record_seeds_decode() {
        for (name, input) in seeds::nvram_records() {
            let (head, rest) = (input[0], &input[1..]);
            let mut block = rest.to_vec();
            let ok = match head & MODE_MASK {
                0 => RecordHeader::decode(rest).is_ok(),
                1 => {
                    block.resize(META_BLOCK as usize, 0);
                    if head & FLAG_SEAL != 0 {
                        put_crc(&mut block, SUPERBLOCK_CRC_AT);
                    }
                    matches!(Superblock::decode(&block), SuperblockState::Valid(_))
                }
                2 => PartitionCheckpoint::decode(rest).is_some(),
                _ => Layout::compute(64 << 20, 4, true).is_some(),
            };
            assert!(ok, "seed {name}");
        }
    }

    #[test]
    fn ownership_seeds_decode_and_load() {
        let all = seeds::ownership_table();
        let table = seed(all.clone(), "table");
        assert!(OwnershipTable::decode(&table_slot(&table[1..], true)).is_some());
        let marks = seed(all.clone(), "marks");
        assert!(FlushMarks::decode(&table_slot(&marks[1..], true)).is_some());
        let store = seed(all, "store");
        let mut f = Fields(&store[1..]);
        let (a, b) = (usize::from(f.u16()), usize::from(f.u16()));
        let rest = f.0;
        let slots = FuzzSlots(Mutex::new(vec![
            table_slot(&rest[..a], true),
            table_slot(&rest[a..a + b], true),
            table_slot(&rest[a + b..], true),
        ]));
        let loaded = ownership::load(&slots).ok().flatten().map(|t| t.generation);
        assert_eq!(loaded, Some(2));
        let marks = ownership::load_marks(&slots, FUZZ_CLUSTER, 0)
            .ok()
            .flatten();
        assert!(marks.is_some());
    }

    #[test]
    fn wire_seeds_decode() {
        for (name, input) in seeds::forward_wire() {
            let ok = if name.starts_with("answer-") {
                true
            } else {
                wire::decode(&input).is_some()
            };
            assert!(ok, "seed {name}");
        }
    }
}
