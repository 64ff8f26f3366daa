//! A TCP proxy on an ephemeral loopback port that a test can cut: while cut,
//! bytes stop flowing both ways on every connection and new connections are
//! accepted but never forwarded — a network partition as the client sees it
//! (requests hang rather than fail), which exercises timeouts.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Forwards connections on [`PartitionProxy::addr`] to a target address.
pub struct PartitionProxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
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
        let (c, s) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (c, s) = (c.clone(), s.clone());
                        std::thread::spawn(move || {
                            let _ = forward(client, target, c, s);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(PartitionProxy { addr, cut, stop })
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
) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    // A partition: the connection is accepted, then nothing happens.
    while cut.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let server = TcpStream::connect(target)?;
    let pairs = [(client.try_clone()?, server.try_clone()?), (server, client)];
    let mut threads = Vec::new();
    for (mut from, mut to) in pairs {
        let (cut, stop) = (cut.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
            let mut buf = vec![0u8; 64 << 10];
            loop {
                if stop.load(Ordering::SeqCst) {
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
