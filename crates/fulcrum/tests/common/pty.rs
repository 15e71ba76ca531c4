//! A program on a pseudo-terminal, driven as a person at a keyboard would: keys in, screen
//! text out (ANSI escapes removed), with bounded waits.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Pty {
    master: File,
    pub child: Child,
    /// Screen text not yet consumed by `expect`.
    pending: String,
}

impl Pty {
    /// Starts `cmd` as the session leader of a new terminal of `cols` columns.
    pub fn spawn(mut cmd: Command, cols: u16) -> Pty {
        let (mut master, mut slave) = (0, 0);
        let size = libc::winsize { ws_row: 40, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: openpty writes two descriptors we then own.
        let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and are owned by nothing else.
        let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let io = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup the terminal"));
        cmd.stdin(io(&slave)).stdout(io(&slave)).stderr(io(&slave));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // A session of its own with this terminal as its controlling terminal, so that
                // Ctrl-C typed on it is a SIGINT to the program, as at a real terminal.
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start the program on the terminal");
        drop(slave);
        Pty { master, child, pending: String::new() }
    }

    pub fn send(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).expect("type on the terminal");
    }

    /// Waits for `needle` on the screen; returns everything shown up to and including it.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.pending.find(needle) {
                let end = i + needle.len();
                let shown = self.pending[..end].to_string();
                self.pending.drain(..end);
                return shown;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{needle:?} not shown within {timeout:?}; the screen shows:\n{}", self.pending);
            let mut poll = libc::pollfd { fd: self.master.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut poll, 1, left.as_millis().min(200) as i32) };
            if ready <= 0 {
                continue;
            }
            let mut buf = [0u8; 4096];
            match self.master.read(&mut buf) {
                Ok(0) | Err(_) => {
                    panic!("the program closed the terminal before {needle:?}; it showed:\n{}", self.pending)
                }
                Ok(n) => self.pending.push_str(&screen_text(&String::from_utf8_lossy(&buf[..n]))),
            }
        }
    }

    /// Waits for the program to exit; true when it exited with status 0.
    pub fn wait_success(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            // Keep reading so the program never blocks on a full terminal.
            let mut buf = [0u8; 4096];
            let mut poll = libc::pollfd { fd: self.master.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut poll, 1, 50) } > 0 {
                let _ = self.master.read(&mut buf);
            }
            if let Some(status) = self.child.try_wait().expect("wait for the program") {
                return status.success();
            }
        }
        false
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Text as a terminal shows it, without escape sequences and carriage returns.
fn screen_text(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // Parameters, then one final byte in @..~.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' | '\u{7}' => {}
            c => out.push(c),
        }
    }
    out
}
