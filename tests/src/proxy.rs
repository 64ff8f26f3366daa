//! A TCP proxy on an ephemeral loopback port that a test can cut: while cut,
//! bytes stop flowing both ways on every connection and new connections are
//! accepted but never forwarded — a network partition as the client sees it
//! (requests hang rather than fail), which exercises timeouts. It can also
//! reset every open connection while accepting new ones: a session that
//! breaks while both ends live on.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Forwards connections on [`PartitionProxy::addr`] to a target address.
pub struct PartitionProxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Bumped by [`PartitionProxy::reset`]: connections opened before close.
    resets: Arc<AtomicU64>,
}

impl PartitionProxy {
    /// Starts forwarding to `target` (`host:port`).
    pub fn start(target: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let target: SocketAddr = target.parse()?;
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let resets = Arc::new(AtomicU64::new(0));
        let (c, s, r) = (cut.clone(), stop.clone(), resets.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (c, s, r) = (c.clone(), s.clone(), r.clone());
                        std::thread::spawn(move || {
                            let _ = forward(client, target, c, s, r);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(PartitionProxy {
            addr,
            cut,
            stop,
            resets,
        })
    }

    /// The address clients should use instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops all traffic through the proxy (connections stay open, silent).
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Lets traffic flow again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Closes every connection open now (both ways); new ones are forwarded
    /// as usual.
    pub fn reset(&self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for PartitionProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn forward(
    client: TcpStream,
    target: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    resets: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let born = resets.load(Ordering::SeqCst);
    client.set_nonblocking(false)?;
    // A partition: the connection is accepted, then nothing happens.
    while cut.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let server = TcpStream::connect(target)?;
    let pairs = [(client.try_clone()?, server.try_clone()?), (server, client)];
    let mut threads = Vec::new();
    for (mut from, mut to) in pairs {
        let (cut, stop, resets) = (cut.clone(), stop.clone(), resets.clone());
        threads.push(std::thread::spawn(move || {
            let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
            let mut buf = vec![0u8; 64 << 10];
            loop {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                if resets.load(Ordering::SeqCst) != born {
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    break;
                }
                if cut.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
