//! A log-shipping destination's NVRAM: one area per source, in the order of the config's
//! `[[shipping.source]]` list, each exactly as large as that source's NVRAM and laid out
//! like it (metadata blocks, then its partitions), so that each record lands at the offset
//! it has in the source's log and a source's post needs no translation. The records are
//! held by a [`SecondStoreArea`] per source, as a pair node holds its partner's.
//!
//! Block 0 of an area (a source's superblock, unused here) holds the area's header: the
//! source's name and geometry. An area whose header names another source or geometry (the
//! list was reordered, a size changed) is refused rather than read as the wrong source's
//! records; a blank one is formatted; anything else is refused as foreign.

use crate::mirror::SecondStoreArea;
use crate::nvram::layout::{Layout, META_BLOCK};
use crate::nvram::NvramRegion;
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"NVMSHPAR";
const VERSION: u32 = 1;
/// Header bytes covered by the trailing crc32c.
const HEADER_BYTES: usize = 124;
const NAME_MAX: usize = 63;

/// What a source's area is laid out for (the source's NVRAM geometry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub partitions: u32,
    pub part_size: u64,
}

impl Geometry {
    /// The geometry of a node's NVRAM of `nvram_bytes` with `partitions` logs and no second
    /// store (a source's), as the engine computes it at format time.
    pub fn of_source_nvram(nvram_bytes: u64, partitions: u32) -> Option<Geometry> {
        let l = Layout::compute(nvram_bytes, partitions, false)?;
        Some(Geometry {
            partitions: l.partitions,
            part_size: l.part_size,
        })
    }

    /// The link's layout tag for log shipping: both ends must hold the same geometry (the
    /// LUNs are the source's business). With the text, for the log.
    pub fn link_tag(&self) -> (u64, String) {
        let text = format!(
            "log shipping: {} partitions of {} bytes",
            self.partitions, self.part_size
        );
        let hash = blake3::hash(text.as_bytes());
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&hash.as_bytes()[..8]);
        (u64::from_le_bytes(tag), text)
    }
}

/// One source's area, opened.
pub struct SourceArea {
    pub source: String,
    pub geometry: Geometry,
    pub held: Arc<SecondStoreArea>,
}

#[derive(Debug, thiserror::Error)]
pub enum AreaError {
    #[error("the NVRAM {path} is {have} bytes but the sources' areas need {need} (the sum of their nvram_size); give nvram.size or a larger device")]
    TooSmall { path: String, have: u64, need: u64 },
    #[error("shipping.source[{index}].nvram_size {size} holds no log of {partitions} partitions")]
    NoGeometry {
        index: usize,
        size: u64,
        partitions: u32,
    },
    #[error("the NVRAM area of source {name} (at byte {offset} of {path}) {problem}. If its records are not needed (the source has flushed every write), clear the area's metadata with `dd if=/dev/zero of={path} bs=4096 seek={block} count={blocks} conv=notrunc` (a file or block device; on device-DAX zero the same bytes with `daxio`) and restart: it is formatted anew")]
    Refused {
        name: String,
        path: String,
        offset: u64,
        block: u64,
        blocks: u64,
        problem: String,
    },
}

/// What an area's header says: whose records it holds, with what geometry, and where the
/// area lies in the destination's NVRAM (a shifted area must not read as its own).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Header {
    source: String,
    geometry: Geometry,
    offset: u64,
    len: u64,
}

const NAME_AT: usize = 40;

fn encode_header(h: &Header) -> [u8; 128] {
    let mut b = [0u8; 128];
    b[0..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&h.geometry.partitions.to_le_bytes());
    b[16..24].copy_from_slice(&h.geometry.part_size.to_le_bytes());
    b[24..32].copy_from_slice(&h.offset.to_le_bytes());
    b[32..40].copy_from_slice(&h.len.to_le_bytes());
    let name = &h.source.as_bytes()[..h.source.len().min(NAME_MAX)];
    b[NAME_AT] = name.len() as u8;
    b[NAME_AT + 1..NAME_AT + 1 + name.len()].copy_from_slice(name);
    let crc = rdma_link::checksum::crc32c(&b[..HEADER_BYTES]);
    b[HEADER_BYTES..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The header, if intact.
fn decode_header(b: &[u8; 128]) -> Option<Header> {
    let crc = u32::from_le_bytes(b[HEADER_BYTES..].try_into().ok()?);
    if &b[0..8] != MAGIC || rdma_link::checksum::crc32c(&b[..HEADER_BYTES]) != crc {
        return None;
    }
    let u32_at = |o: usize| b[o..o + 4].try_into().ok().map(u32::from_le_bytes);
    let u64_at = |o: usize| b[o..o + 8].try_into().ok().map(u64::from_le_bytes);
    if u32_at(8)? != VERSION {
        return None;
    }
    let len = (b[NAME_AT] as usize).min(NAME_MAX);
    Some(Header {
        source: String::from_utf8_lossy(&b[NAME_AT + 1..NAME_AT + 1 + len]).into_owned(),
        geometry: Geometry {
            partitions: u32_at(12)?,
            part_size: u64_at(16)?,
        },
        offset: u64_at(24)?,
        len: u64_at(32)?,
    })
}

/// Opens (or formats, when blank) the area of every source, in the config's order:
/// `sources` is (name, nvram_size) of each.
pub fn open_areas(
    nvram: &Arc<NvramRegion>,
    partitions: u32,
    sources: &[(String, u64)],
) -> Result<Vec<SourceArea>, AreaError> {
    let path = nvram.path().display().to_string();
    let need = sources
        .iter()
        .try_fold(0u64, |sum, (_, size)| sum.checked_add(*size))
        .unwrap_or(u64::MAX);
    if nvram.len() < need {
        return Err(AreaError::TooSmall {
            path,
            have: nvram.len(),
            need,
        });
    }
    let mut areas = Vec::new();
    let mut offset = 0u64;
    for (index, (source, size)) in sources.iter().enumerate() {
        let geometry =
            Geometry::of_source_nvram(*size, partitions).ok_or(AreaError::NoGeometry {
                index,
                size: *size,
                partitions,
            })?;
        let meta = Layout::metadata_bytes(geometry.partitions);
        let refused = |problem: String| AreaError::Refused {
            name: source.clone(),
            path: path.clone(),
            offset,
            block: offset / META_BLOCK,
            blocks: meta / META_BLOCK,
            problem,
        };
        let region = Arc::new(
            NvramRegion::window(nvram, offset, *size)
                .ok_or_else(|| refused("lies beyond the NVRAM".into()))?,
        );
        let want = Header {
            source: source.clone(),
            geometry,
            offset,
            len: *size,
        };
        let mut header = [0u8; 128];
        region.read_at(0, &mut header);
        match decode_header(&header) {
            Some(found) if found == want => {}
            Some(found) => {
                return Err(refused(format!(
                    "holds the records of source {} ({} partitions of {} bytes, an area of {} bytes at byte {}), but the config puts source {source} ({} partitions of {} bytes, {} bytes) here: the [[shipping.source]] list changed order, or a size changed",
                    found.source, found.geometry.partitions, found.geometry.part_size, found.len, found.offset, geometry.partitions, geometry.part_size, size
                )))
            }
            // Blank only if every metadata block is: a header lost with watermarks left
            // behind is damage (or another layout's area), not a fresh device.
            None if is_zero(&region, meta) => format(&region, &want)
                .map_err(|e| refused(format!("could not be formatted: {e}")))?,
            None => {
                return Err(refused(
                    "holds something that is not a log-shipping area (another node's NVRAM, an area of another layout, or damage)".into(),
                ))
            }
        }
        tracing::info!(
            source,
            offset,
            "NVRAM area: {} partitions of {} bytes",
            geometry.partitions,
            geometry.part_size
        );
        areas.push(SourceArea {
            source: source.clone(),
            geometry,
            held: SecondStoreArea::of_source(region, geometry.partitions, geometry.part_size),
        });
        offset += size;
    }
    Ok(areas)
}

/// Whether the first `len` bytes of `region` are all zero.
fn is_zero(region: &NvramRegion, len: u64) -> bool {
    let mut block = vec![0u8; META_BLOCK as usize];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(META_BLOCK) as usize;
        region.read_at(off, &mut block[..n]);
        if block[..n].iter().any(|&b| b != 0) {
            return false;
        }
        off += n as u64;
    }
    true
}

/// A blank area: its header, durably (its metadata blocks are zero already).
fn format(region: &NvramRegion, header: &Header) -> std::io::Result<()> {
    region.write_at(0, &encode_header(header));
    region.persist(0, 128)?;
    tracing::info!(source = header.source, "NVRAM area formatted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::memory::MemoryNvram;

    const MIB: u64 = 1 << 20;

    fn nvram(len: u64) -> Arc<NvramRegion> {
        Arc::new(NvramRegion::in_memory(Arc::new(MemoryNvram::new(
            "dest",
            len as usize,
        ))))
    }

    fn sources(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    #[test]
    fn areas_are_formatted_once_and_then_recognised() {
        let nv = nvram(48 * MIB);
        let list = sources(&[("src1", 16 * MIB), ("src2", 32 * MIB)]);
        let areas = open_areas(&nv, 2, &list).unwrap();
        assert_eq!(areas.len(), 2);
        // The same geometry as the source's own NVRAM of that size.
        assert_eq!(
            areas[1].geometry,
            Geometry::of_source_nvram(32 * MIB, 2).unwrap()
        );
        drop(areas);
        let again = open_areas(&nv, 2, &list).unwrap();
        assert_eq!(again[0].source, "src1");
    }

    #[test]
    fn a_reordered_list_or_foreign_contents_are_refused_with_the_fix() {
        let nv = nvram(32 * MIB);
        open_areas(&nv, 2, &sources(&[("src1", 16 * MIB), ("src2", 16 * MIB)])).unwrap();
        let e = open_areas(&nv, 2, &sources(&[("src2", 16 * MIB), ("src1", 16 * MIB)]))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("holds the records of source src1") && e.contains("dd if=/dev/zero"),
            "{e}"
        );
        // An area whose size changed by less than its rounding slack (the geometry is the
        // same) is refused too: the areas after it would have moved.
        let nv = nvram(32 * MIB);
        open_areas(&nv, 2, &sources(&[("src1", 16 * MIB), ("src2", 16 * MIB)])).unwrap();
        let e = open_areas(
            &nv,
            2,
            &sources(&[("src1", 16 * MIB - 4096), ("src2", 16 * MIB)]),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("source src1") && e.contains("a size changed"),
            "{e}"
        );
        // Past that area: one whose header is gone but whose watermarks are not is not blank.
        let nv = nvram(16 * MIB);
        open_areas(&nv, 2, &sources(&[("src1", 16 * MIB)])).unwrap();
        nv.write_at(4096, &[7u8; 48]);
        nv.write_at(0, &[0u8; 128]);
        let e = open_areas(&nv, 2, &sources(&[("src1", 16 * MIB)]))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("not a log-shipping area") && e.contains("count=3"),
            "{e}"
        );
        let other = nvram(16 * MIB);
        other.write_at(0, b"NVMIRROR superblock of a pair node");
        let e = open_areas(&other, 2, &sources(&[("src1", 16 * MIB)]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a log-shipping area"), "{e}");
        let e = open_areas(&nvram(8 * MIB), 2, &sources(&[("src1", 16 * MIB)]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("need 16777216"), "{e}");
    }

    #[test]
    fn the_link_tag_follows_the_geometry_only() {
        let a = Geometry::of_source_nvram(16 * MIB, 4).unwrap();
        let b = Geometry::of_source_nvram(16 * MIB, 2).unwrap();
        assert_eq!(a.link_tag(), a.link_tag());
        assert_ne!(a.link_tag().0, b.link_tag().0);
    }
}
