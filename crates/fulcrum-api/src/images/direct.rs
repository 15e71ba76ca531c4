//! Writes an uploaded package with `O_DIRECT`: the bytes go from one aligned buffer straight to
//! the disk. Buffered writes would copy every byte into the page cache (on a 2-core machine that
//! copy costs as much CPU as a sha256) and leave the whole file to the final fsync; direct writes
//! keep the disk busy while the upload is still arriving, so the fsync has only metadata left.
//! A file system that refuses `O_DIRECT` gets ordinary buffered writes.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;

/// Alignment of the buffer, of each direct write's length and of the file offset.
const ALIGN: usize = 4096;
/// Bytes gathered before one write: large enough that the disk sees few, long requests.
const BUFFER: usize = 4 << 20;

pub(super) struct DirectWriter {
    file: File,
    buf: Vec<u8>,
    /// Where the aligned window of `buf` starts.
    start: usize,
    filled: usize,
    direct: bool,
}

impl DirectWriter {
    /// Takes a freshly created, empty file.
    pub(super) fn new(file: File) -> DirectWriter {
        let buf = vec![0u8; BUFFER + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        let mut writer = DirectWriter { file, buf, start, filled: 0, direct: false };
        writer.direct = writer.set_direct(true).is_ok();
        writer
    }

    fn set_direct(&mut self, on: bool) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: fcntl on a descriptor this writer owns; no memory is passed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on { flags | libc::O_DIRECT } else { flags & !libc::O_DIRECT };
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.direct = on;
        Ok(())
    }

    pub(super) fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = (BUFFER - self.filled).min(data.len());
            let at = self.start + self.filled;
            self.buf[at..at + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == BUFFER {
                self.write_out(BUFFER)?;
                self.filled = 0;
            }
        }
        Ok(())
    }

    /// Writes the first `len` bytes of the window. A direct write the file system refuses, or one
    /// cut short at an unaligned length, switches the rest of the file to buffered writes.
    fn write_out(&mut self, len: usize) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let chunk = &self.buf[self.start + done..self.start + len];
            match (&self.file).write(chunk) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    done += n;
                    if self.direct && !n.is_multiple_of(ALIGN) {
                        self.set_direct(false)?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => self.set_direct(false)?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes what is left (the unaligned tail through the page cache) and fsyncs the data.
    pub(super) fn finish(mut self) -> io::Result<()> {
        let aligned = self.filled / ALIGN * ALIGN;
        if aligned > 0 {
            self.write_out(aligned)?;
        }
        if self.filled > aligned {
            if self.direct {
                self.set_direct(false)?;
            }
            let tail = &self.buf[self.start + aligned..self.start + self.filled];
            (&self.file).write_all(tail)?;
        }
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Sizes around the buffer and the alignment, written in uneven pieces, read back exactly.
    #[test]
    fn writes_every_byte_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for (i, len) in
            [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, BUFFER, BUFFER + 1, 2 * BUFFER + ALIGN + 7].iter().enumerate()
        {
            let path = dir.path().join(format!("f{i}"));
            let data = pattern(*len);
            let mut writer = DirectWriter::new(File::create(&path).unwrap());
            for piece in data.chunks(65_537) {
                writer.write(piece).unwrap();
            }
            writer.finish().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data, "length {len}");
        }
    }

    /// A file system without O_DIRECT (or a refused flag) still gets every byte.
    #[test]
    fn buffered_when_direct_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = pattern(BUFFER + 3 * ALIGN + 5);
        let mut writer = DirectWriter::new(File::create(&path).unwrap());
        writer.set_direct(false).unwrap();
        writer.write(&data).unwrap();
        writer.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }
}
