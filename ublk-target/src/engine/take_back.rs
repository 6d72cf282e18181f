//! Log shipping (claim set C): a source takes its volume back from the destination's images
//! after an export (`nvmirrorctl return-image`). Before it serves, with its log drained, it
//! compares its medium with the images block by block (crc32c digests, `OP_VERIFY_DIGESTS`,
//! as the online verify does) and copies the blocks that differ (`OP_READ_MEDIUM`), so only
//! what changed since the export crosses the link: the images' writes while they were
//! served elsewhere, and whatever the source's medium had that the images never got (writes
//! it died with in flight, never acknowledged).

use super::core::Engine;
use super::verify::VERIFY_CHUNK;
use crate::cluster::wire;
use crate::host::run_blocking;
use serde::{Deserialize, Serialize};
use std::future::Future;

/// Bytes per read of the image (well under the link's largest answer).
const COPY_PIECE: u64 = 256 << 10;

/// What taking a LUN back copied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakenBack {
    pub lun: String,
    pub compared_bytes: u64,
    pub copied_bytes: u64,
    pub copied_extents: u64,
}

impl Engine {
    /// Makes our medium of LUN `l` equal to the destination's image of it: every block whose
    /// digest differs is read from the image (`ask` carries a request to the destination
    /// and returns its answer) and written to our medium, which is then synced. Only for a
    /// node that serves nothing yet (no device, an empty log): the copies bypass the log.
    pub async fn take_back_lun<Asked>(
        &self,
        l: u32,
        ask: &impl Fn(Vec<u8>) -> Asked,
    ) -> Result<TakenBack, String>
    where
        Asked: Future<Output = Result<Vec<u8>, String>>,
    {
        let lun = self
            .luns
            .get(l as usize)
            .cloned()
            .ok_or_else(|| format!("LUN {l} does not exist"))?;
        if let Some(p) = self.parts.iter().find(|p| p.status().records_unflushed > 0) {
            return Err(format!(
                "partition {} still holds records: the log must be empty before the volume is taken back",
                p.id
            ));
        }
        let image_len = wire::answer(&ask(wire::encode(wire::OP_IMAGE_LEN, l, 0, 0, &[])).await?)
            .map_err(|e| format!("the length of the image of LUN {}: {e}", lun.name))
            .and_then(|a| {
                Ok(u64::from_le_bytes(a.try_into().map_err(|_| {
                    format!("the destination's answer about the length of the image of LUN {} is malformed", lun.name)
                })?))
            })?;
        // The images' node served the image at its own length: blocks it wrote past our end
        // would be lost here without a word.
        if image_len > lun.size {
            return Err(format!(
                "the destination's image of LUN {} is {image_len} bytes, longer than the LUN here ({} bytes): what the images' node wrote past our end would be lost. Make the LUN (lun.size and its medium) at least {image_len} bytes, or, if nothing past {} bytes matters, truncate the image (on the destination: truncate -s {} SHIPPING_DIR/{}/lun{l}.img) and start again",
                lun.name,
                lun.size,
                lun.size,
                lun.size,
                self.node_name()
            ));
        }
        let mut report = TakenBack {
            lun: lun.name.clone(),
            ..TakenBack::default()
        };
        let mut at = 0;
        while at < lun.size {
            let len = (lun.size - at).min(VERIFY_CHUNK as u64);
            let extents = self.differing(l, &lun, (at, len), ask).await?;
            report.copied_extents += extents.len() as u64;
            let pieces = extents.into_iter().flat_map(|(start, n)| {
                (start..start + n)
                    .step_by(COPY_PIECE as usize)
                    .map(move |s| (s, COPY_PIECE.min(start + n - s)))
            });
            for (start, n) in pieces {
                let req = wire::encode(wire::OP_READ_MEDIUM, l, start, n as u32, &[]);
                let data = wire::answer(&ask(req).await?)
                    .map_err(|e| format!("the image of LUN {} at {start}: {e}", lun.name))?
                    .to_vec();
                if data.len() as u64 != n {
                    return Err(format!(
                        "the destination answered {} bytes of the image at {start}, not {n}",
                        data.len()
                    ));
                }
                let medium = lun.medium.clone();
                run_blocking(self.host.as_ref(), move || medium.write_at(&data, start))
                    .await
                    .map_err(|e| format!("writing our medium at {start}: {e}"))?;
                report.copied_bytes += n;
            }
            report.compared_bytes += len;
            at += len;
        }
        let medium = lun.medium.clone();
        run_blocking(self.host.as_ref(), move || medium.sync())
            .await
            .map_err(|e| format!("syncing our medium: {e}"))?;
        Ok(report)
    }

    /// The destination serves our volume from its images (it was exported while we were cut
    /// off from it): from now on this node serves none of it. Every partition stops, so
    /// reads and writes get EIO; what the partitions hold stays in the NVRAM until the next
    /// start, which takes the volume back (or refuses to serve) as the destination says.
    pub fn stop_serving_volume(&self, why: &str) {
        for p in &self.parts {
            p.fail(why.to_owned());
        }
    }

    /// Per partition, the last seq our log has handed out (an empty log: everything
    /// through it has left).
    pub fn log_heads(&self) -> Vec<u64> {
        self.parts
            .iter()
            .map(|p| p.status().next_seq.saturating_sub(1))
            .collect()
    }
}
