//! The terminal: its width, a password read without echo, and Ctrl-C.
//!
//! Ctrl-C while a command runs cancels that command, not the shell: SIGINT only raises a flag
//! that long commands (an upload) look at between steps. While the shell waits at its prompt
//! the terminal is in raw mode and Ctrl-C reaches the line editor as a key instead.

use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the handler (once per process).
pub fn catch_ctrl_c() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigint as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            // SA_RESTART: a blocking read in progress carries on; the flag is seen afterwards.
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
        }
    });
}

/// Whether Ctrl-C was pressed since the last `clear`.
pub fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Forgets an earlier Ctrl-C (before each command).
pub fn clear() {
    INTERRUPTED.store(false, Ordering::SeqCst);
}

/// For tests: acts as if Ctrl-C was pressed.
pub fn raise() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Sleeps up to `total`, returning early (false) when Ctrl-C is pressed.
pub fn sleep(total: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + total;
    while std::time::Instant::now() < until {
        if requested() {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50).min(until - std::time::Instant::now()));
    }
    !requested()
}

/// Reads a password from the terminal without echoing it (from standard input as a plain line
/// when that is not a terminal, as `sudo -S` does).
pub fn read_password(prompt: &str) -> Result<String, String> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    // Echo goes off before the prompt shows: a password typed (or pasted) the moment the
    // prompt appears must not be echoed.
    // SAFETY: termios is plain data; tcgetattr fills it, tcsetattr reads it.
    let saved = terminal.then(|| unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        libc::tcgetattr(libc::STDIN_FILENO, &mut t);
        let mut quiet = t;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &quiet);
        t
    });
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(t) = saved {
        // SAFETY: as above; restores what was there.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
    }
    match read {
        Ok(0) => Err("no password given".into()),
        Ok(_) => Ok(line.trim_end_matches(['\n', '\r']).to_string()),
        Err(e) => Err(format!("cannot read the password: {e}")),
    }
}

/// Columns of the terminal the shell prints to: the window's when standard output is one,
/// else `COLUMNS`, else none (output to a file or pipe is not cut).
pub fn width() -> Option<usize> {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        // SAFETY: winsize is plain data that the ioctl fills.
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        if unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0 && size.ws_col > 0 {
            return Some(size.ws_col as usize);
        }
    }
    std::env::var("COLUMNS").ok().and_then(|c| c.trim().parse().ok()).filter(|c| *c > 0)
}
