//! The model file mapped into memory (memmap2): weights are read from the page cache where
//! they lie, and those kept in their GGUF blocks are never copied, so loading reads only the
//! pages used and the weights' memory is the file's (shared, reclaimable) pages.
//!
//! The header is checked first on the open handle ([`crate::check_gguf_file`]'s walk), then
//! the file is mapped and every tensor's byte range is checked against the map's length: a
//! file that shrank between the check and the map is refused, not read past its end. A file
//! truncated by another process *after* it is mapped makes later reads of the lost pages
//! fault (SIGBUS), as with every memory-mapped loader; model files are not rewritten in
//! place.
#![allow(unsafe_code)]

use std::io::Cursor;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, TensorInfo};
use memmap2::Mmap;

use crate::config::one_line;
use crate::{ModelError, Result};

/// A mapped GGUF file with its parsed header.
#[derive(Debug, Clone)]
pub(crate) struct GgufMap {
    map: Arc<Mmap>,
    path: PathBuf,
}

impl GgufMap {
    /// Opens `path` (a regular file), checks its header, maps it and parses the header from
    /// the map; refuses a map shorter than the header's tensors need.
    pub(crate) fn open(path: &Path) -> Result<(Content, Self)> {
        let file = crate::files::open_regular(path)?;
        crate::gguf_check::check_open_file(&file, path)?;
        // SAFETY: the map is read-only and private to this process; the file is a regular
        // file (checked on this handle). Its contents may change under the map only if
        // another process rewrites the model file, which the module comment documents.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let content =
            Content::read(&mut Cursor::new(&map[..])).map_err(|e| ModelError::InvalidGguf {
                path: path.to_path_buf(),
                detail: one_line(&e.to_string()),
            })?;
        let this = Self {
            map: Arc::new(map),
            path: path.to_path_buf(),
        };
        for (name, info) in &content.tensor_infos {
            this.range(&content, name, info)?;
        }
        Ok((content, this))
    }

    /// The whole file.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The shared map, for weights that reference it.
    pub(crate) fn map(&self) -> &Arc<Mmap> {
        &self.map
    }

    /// The byte range of tensor `name` in the file, checked against the map's length.
    pub(crate) fn range(
        &self,
        content: &Content,
        name: &str,
        info: &TensorInfo,
    ) -> Result<Range<usize>> {
        let dtype = info.ggml_dtype;
        let elements = info.shape.elem_count();
        let size = (elements / dtype.block_size()).checked_mul(dtype.type_size());
        let start = content.tensor_data_offset.checked_add(info.offset);
        let range = match (start.and_then(|s| usize::try_from(s).ok()), size) {
            (Some(s), Some(n)) => s.checked_add(n).map(|e| s..e),
            _ => None,
        };
        match range {
            Some(r) if r.end <= self.map.len() => Ok(r),
            _ => Err(ModelError::InvalidGguf {
                path: self.path.clone(),
                detail: format!(
                    "tensor {:?} lies past the end of the mapped file ({} bytes): the file is \
                     shorter than its header says (truncated, or shrank while being opened)",
                    crate::escape::escape(name),
                    self.map.len()
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// A GGUF file with one Q8_0 tensor `w` of `[2, 32]`.
    fn file(name: &str) -> (PathBuf, Vec<u8>) {
        let t = Tensor::arange(0f32, 64., &Device::Cpu)
            .unwrap()
            .reshape((2, 32))
            .unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let mut bytes = Cursor::new(Vec::new());
        gguf_file::write(&mut bytes, &[], &[("w", &q)]).unwrap();
        let path = std::env::temp_dir().join(format!("kv-mapped-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes.get_ref()).unwrap();
        (path, q.data().unwrap().into_owned())
    }

    #[test]
    fn tensors_are_read_in_place_and_ranges_past_the_map_refused() {
        let (path, data) = file("ok.gguf");
        let (content, map) = GgufMap::open(&path).unwrap();
        let info = &content.tensor_infos["w"];
        let r = map.range(&content, "w", info).unwrap();
        assert_eq!(&map.bytes()[r], &data[..]);
        // A directory entry pointing past the end (what a file that shrank after its
        // header was checked looks like) is an error naming the tensor, not a read.
        let mut far = TensorInfo {
            ggml_dtype: info.ggml_dtype,
            shape: info.shape.clone(),
            offset: map.bytes().len() as u64,
        };
        let e = map.range(&content, "w", &far).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
        far.offset = u64::MAX;
        assert!(map.range(&content, "w", &far).is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_truncated_file_is_refused_before_mapping() {
        let (path, _) = file("short.gguf");
        let bytes = std::fs::read(&path).unwrap();
        // The writer may pad after the 68 bytes of data: cut into the data itself.
        std::fs::write(&path, &bytes[..bytes.len() - 40]).unwrap();
        assert!(GgufMap::open(&path).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
