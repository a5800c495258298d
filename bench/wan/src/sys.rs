//! The system side: root check, network namespaces (via `ip netns`), and TUN
//! devices opened inside a namespace (via `setns` on a short-lived thread).

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::WanError;

/// Whether the process runs as root (needed for namespaces and TUN).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with [`WanError::NotRoot`] unless running as root.
pub fn require_root() -> Result<(), WanError> {
    if is_root() {
        Ok(())
    } else {
        Err(WanError::NotRoot)
    }
}

/// Runs a command to completion; a non-zero exit is an error carrying stderr.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<Output, WanError> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| WanError::Spawn {
            cmd: shown.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(WanError::Command {
            cmd: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn ip<I, S>(args: I) -> Result<Output, WanError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_checked(Command::new("ip").args(args))
}

/// A network namespace created with `ip netns add`, deleted on drop after
/// killing every process still inside it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace and brings its loopback up.
    pub fn create(name: &str) -> Result<Self, WanError> {
        ip(["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ip(["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as in `ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Process ids living in the namespace.
    pub fn pids(&self) -> Vec<i32> {
        match Command::new("ip")
            .args(["netns", "pids", &self.name])
            .stderr(Stdio::null())
            .output()
        {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Opens a TUN device named `ifname` inside this namespace and returns
    /// its (non-blocking) file descriptor. The device belongs to the
    /// namespace; the descriptor can be used from any thread.
    pub fn open_tun(&self, ifname: &str) -> Result<OwnedFd, WanError> {
        let path = format!("/run/netns/{}", self.name);
        let ifname = ifname.to_owned();
        std::thread::Builder::new()
            .name("wan-setns".into())
            .spawn(move || open_tun_in(&path, &ifname))
            .map_err(|e| WanError::io("spawning the setns thread", e))?
            .join()
            .map_err(|_| WanError::io("setns thread", std::io::Error::other("panicked")))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Bounded: a few rounds of SIGKILL to whatever still lives inside.
        for _ in 0..5 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill has no memory-safety preconditions; the pids
                // are processes inside a namespace this process created.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Runs on a throwaway thread: enter the namespace, open the TUN there.
fn open_tun_in(ns_path: &str, ifname: &str) -> Result<OwnedFd, WanError> {
    let ns = File::open(ns_path).map_err(|e| WanError::io("opening the namespace", e))?;
    // SAFETY: valid fd; setns only changes this (throwaway) thread's netns.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(WanError::io("setns", std::io::Error::last_os_error()));
    }
    // SAFETY: the path is a valid NUL-terminated string.
    let raw = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if raw < 0 {
        return Err(WanError::io(
            "opening /dev/net/tun",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `raw` is a freshly opened descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    let bytes = ifname.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(WanError::InvalidName(ifname.to_owned()));
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq mirrors
    // (16-byte name, then a union of at least 24 bytes starting with flags).
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(WanError::io("TUNSETIFF", std::io::Error::last_os_error()));
    }
    Ok(fd)
}

/// Sets the address, MTU and state of a TUN device inside a namespace. The
/// `/24` prefix also installs the route for the emulated subnet via the TUN.
pub(crate) fn configure_tun(ns: &Netns, ifname: &str, cidr: &str) -> Result<(), WanError> {
    ip(["-n", ns.name(), "addr", "add", cidr, "dev", ifname])?;
    ip([
        "-n",
        ns.name(),
        "link",
        "set",
        ifname,
        "mtu",
        "1500",
        "txqueuelen",
        "1000",
        "up",
    ])?;
    Ok(())
}

/// Lowers the calling thread's timer slack so short sleeps wake on time.
pub(crate) fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer (nanoseconds).
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong) };
}

/// Non-blocking read; `Ok(None)` when nothing is ready.
pub(crate) fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = std::io::Error::last_os_error();
        match err.kind() {
            std::io::ErrorKind::WouldBlock => return Ok(None),
            std::io::ErrorKind::Interrupted => continue,
            _ => return Err(err),
        }
    }
}

/// Waits up to `timeout` for the descriptor to become readable.
pub(crate) fn poll_readable(fd: &OwnedFd, timeout: Duration) {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// Writes one packet; errors are the caller's to count.
pub(crate) fn write_fd(fd: &OwnedFd, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: buf is valid for reads of buf.len() bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Deletes namespaces left by `cairn-wan` processes that no longer exist
/// (`cwan<pid>x…` with no such pid), killing whatever still runs inside.
/// Returns the names removed.
pub fn remove_stale() -> Result<Vec<String>, WanError> {
    let dir = match std::fs::read_dir("/run/netns") {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(WanError::io("listing /run/netns", e)),
    };
    let mut removed = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("cwan")
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        drop(Netns { name: name.clone() });
        removed.push(name);
    }
    Ok(removed)
}
