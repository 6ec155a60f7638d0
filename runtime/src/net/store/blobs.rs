//! Modules and images: content-addressed files, and small images kept inline in the database.
//!
//! Files are written to a temporary name and synced before a record names them
//! ([`HostStore::stage_image`]), and renamed durably as that record is written, so a record
//! never points at a missing or torn file. A small image goes in the transaction of the record
//! that names it, which is cheaper than a file and its syncs.

use super::schema::IMAGES;
use super::{HostStore, StoreError, blocking};
use crate::image::AgentImage;
use crate::modules::{ModuleHash, publish, write_durably, write_synced};
use redb::{ReadableDatabase, WriteTransaction};
use std::path::{Path, PathBuf};

/// Images up to this size live in the database; larger ones are files.
pub(crate) const INLINE_IMAGE: usize = 1 << 20;

/// Images at least this large are named by the digest their header claims; smaller ones by
/// hashing their bytes, which is quicker than reading the header.
const NAMED_BY_CLAIM: usize = 64 << 10;

/// An image written ahead of the record that will name it ([`HostStore::stage_image`]). A
/// large one is a synced file under a temporary name, removed if it is dropped unnamed.
#[derive(Debug)]
pub struct Staged {
    pub(super) name: String,
    pub(super) file: Option<PathBuf>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(tmp) = self.file.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// An image file no durable record names once the transaction that dropped it is durable.
pub(super) type Stale = Option<PathBuf>;

impl HostStore {
    fn module_path(&self, hash: &ModuleHash) -> PathBuf {
        self.dir.join("modules").join(format!("{hash}.wasm"))
    }

    /// Keeps a module's bytes (named by their hash).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn put_module(&self, hash: &ModuleHash, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.module_path(hash);
        if path.exists() {
            return Ok(());
        }
        write_durably(&path, bytes).map_err(|source| StoreError::Io { path, source })
    }

    /// Whether a module's bytes are kept here.
    pub fn has_module(&self, hash: &ModuleHash) -> bool {
        self.module_path(hash).exists()
    }

    /// A module's bytes, if kept here.
    pub fn module(&self, hash: &ModuleHash) -> Option<Vec<u8>> {
        std::fs::read(self.module_path(hash)).ok()
    }

    /// Makes an image ready to be named by a record: a large image is written to a file and
    /// synced now, outside any transaction, so that other writers need not wait for it and
    /// an arriving image can be written while it is checked. A small one goes in the
    /// transaction that names it. `image` is its bytes in parts read one after the other (as
    /// [`crate::image::Encoded::parts`]), the header whole in the first.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn stage_image(&self, image: &[&[u8]]) -> Result<Staged, StoreError> {
        let name = format!("{}.img", blake3::Hash::from(image_hash(image)).to_hex());
        let file = match total(image) <= INLINE_IMAGE {
            true => None,
            false => {
                let dir = self.dir.join("images");
                Some(
                    write_synced(&dir, image)
                        .map_err(|source| StoreError::Io { path: dir, source })?,
                )
            }
        };
        Ok(Staged { name, file })
    }

    /// Gives a staged image its name: a file is renamed (durably) before the record naming it
    /// commits, so a record never names a missing file.
    /// On failure the staged file goes with `staged`.
    pub(super) fn publish(&self, mut staged: Staged) -> Result<String, StoreError> {
        if let Some(tmp) = &staged.file {
            let path = self.dir.join("images").join(&staged.name);
            publish(tmp, &path).map_err(|source| StoreError::Io { path, source })?;
            staged.file = None;
        }
        Ok(std::mem::take(&mut staged.name))
    }

    /// Stages and publishes an image, off the async workers when it is a file: its name, and
    /// its bytes when the database keeps them.
    pub(super) fn stage_published(
        &self,
        image: &[&[u8]],
    ) -> Result<(String, Option<Vec<u8>>), StoreError> {
        let stage = || Ok((self.publish(self.stage_image(image)?)?, inline(image)));
        match total(image) > INLINE_IMAGE {
            true => blocking(stage),
            false => stage(),
        }
    }

    /// Reads an image.
    ///
    /// # Errors
    /// When it is neither in the database nor a readable file.
    pub fn image(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(IMAGES)?;
        if let Some(bytes) = table.get(name)? {
            return Ok(bytes.value().to_vec());
        }
        let path = self.dir.join("images").join(name);
        std::fs::read(&path).map_err(|source| StoreError::Io { path, source })
    }
}

/// The digest that names an image. An image that stands alone is named by the digest its
/// header claims: a staged arrival is published only once decoding has checked that digest. A
/// small one is hashed instead: that costs less than decoding its header (context and trace
/// included), and every hop stores two.
fn image_hash(image: &[&[u8]]) -> [u8; 32] {
    let claimed = (total(image) >= NAMED_BY_CLAIM)
        .then(|| {
            image
                .first()
                .and_then(|head| AgentImage::claimed_digest(head))
        })
        .flatten();
    claimed.unwrap_or_else(|| {
        let mut hasher = blake3::Hasher::new();
        for part in image {
            hasher.update(part);
        }
        *hasher.finalize().as_bytes()
    })
}

/// Length of an image given in parts.
pub(super) fn total(image: &[&[u8]]) -> usize {
    image.iter().map(|part| part.len()).sum()
}

/// The bytes of an image kept in the database (a small one), or `None` for a file.
pub(super) fn inline(image: &[&[u8]]) -> Option<Vec<u8>> {
    (total(image) <= INLINE_IMAGE).then(|| image.concat())
}

/// Keeps a small image under `name` in `txn` (see [`inline`]).
pub(super) fn put_inline(
    txn: &WriteTransaction,
    name: &str,
    inline: Option<&[u8]>,
) -> Result<(), StoreError> {
    if let Some(image) = inline {
        txn.open_table(IMAGES)?.insert(name, image)?;
    }
    Ok(())
}

/// Drops an image no record names any more: in `txn`, or, for a file under `dir`, returns
/// its path to unlink once `txn` is durable (a crash before then keeps the old record, which
/// still needs the file).
pub(super) fn remove_image(
    dir: &Path,
    txn: &WriteTransaction,
    name: &str,
) -> Result<Stale, StoreError> {
    let inline = txn.open_table(IMAGES)?.remove(name)?.is_some();
    Ok((!inline).then(|| dir.join("images").join(name)))
}

/// Deletes a stale image file, off the async workers: freeing a large file's blocks takes a
/// while. Failing only leaves a file behind.
pub(super) fn unlink(stale: Stale) {
    if let Some(path) = stale {
        blocking(|| std::fs::remove_file(path)).ok();
    }
}
