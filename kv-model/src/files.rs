//! Opening the files a user names (models, texts, prompt lists) safely: only regular
//! files, never a FIFO, device or directory, which could block forever or stream without
//! end.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::{ModelError, Result};

/// Longest text file read whole (`kv ppl --text`, `kv batch --prompts`): 1 GiB.
pub const MAX_TEXT_BYTES: u64 = 1 << 30;

/// Opens `path` for reading if it is a regular file (symbolic links followed).
///
/// On Unix the file is opened non-blocking and checked with `fstat` on the open handle, so
/// a FIFO is refused at once (opening one for reading would wait for a writer) and no other
/// file can be swapped in between the check and the open.
///
/// ```
/// let e = kv_model::open_regular(std::env::temp_dir()).unwrap_err();
/// assert!(matches!(e, kv_model::ModelError::NotARegularFile { .. }), "{e}");
/// ```
///
/// # Errors
/// [`ModelError::ModelNotFound`] for a missing path, [`ModelError::NotARegularFile`] for a
/// directory, FIFO, socket or device, [`ModelError::Io`] for other failures.
pub fn open_regular(path: impl AsRef<Path>) -> Result<File> {
    let path = path.as_ref();
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Non-blocking: opening a FIFO returns at once instead of waiting for a writer.
        // Regular files ignore the flag for reads.
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| ModelError::io(path, e))?;
    let meta = file.metadata().map_err(|e| ModelError::io(path, e))?;
    if !meta.is_file() {
        return Err(ModelError::NotARegularFile {
            path: path.to_path_buf(),
            kind: file_kind(&meta),
        });
    }
    Ok(file)
}

/// Reads the regular file at `path` as UTF-8 text of at most [`MAX_TEXT_BYTES`].
///
/// # Errors
/// Those of [`open_regular`] (with [`ModelError::Io`] instead of `ModelNotFound` for a
/// missing file), [`ModelError::InvalidArgument`] for a file over the limit, and
/// [`ModelError::Io`] for text that is not UTF-8.
pub fn read_text(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let file = open_regular(path).map_err(|e| match e {
        ModelError::ModelNotFound { path } => ModelError::Io {
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
            path,
        },
        e => e,
    })?;
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    if len > MAX_TEXT_BYTES {
        return Err(ModelError::InvalidArgument {
            what: "text file",
            expected: format!("at most {MAX_TEXT_BYTES} bytes"),
            got: format!("{} ({len} bytes)", path.display()),
        });
    }
    let mut text = String::new();
    // The length is checked; take() also bounds a file that grows while it is read.
    file.take(MAX_TEXT_BYTES)
        .read_to_string(&mut text)
        .map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(text)
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_socket() {
            return "a socket";
        }
        if ft.is_block_device() || ft.is_char_device() {
            return "a device";
        }
    }
    "not a regular file"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_and_devices_are_refused() {
        let e = open_regular(std::env::temp_dir()).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        #[cfg(unix)]
        {
            let e = open_regular("/dev/zero").unwrap_err();
            assert!(e.to_string().contains("a device"), "{e}");
            let e = read_text("/dev/zero").unwrap_err();
            assert!(matches!(e, ModelError::NotARegularFile { .. }), "{e}");
        }
    }

    #[test]
    fn regular_files_open_and_read() {
        let path = std::env::temp_dir().join(format!("kv-files-test-{}", std::process::id()));
        std::fs::write(&path, "hello").unwrap();
        assert_eq!(read_text(&path).unwrap(), "hello");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(read_text(&path), Err(ModelError::Io { .. })));
    }
}
