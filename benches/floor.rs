//! The floor: the least a WebSocket chat relay can do on this machine.
//!
//! One thread, one `mio::Poll`, a `Slab` of sockets. It accepts WebSockets
//! at `/ws/{room}` with a minimal handshake (parse the request head, answer
//! `101` with the accept key) and copies every data frame it receives,
//! unmasked and re-encoded once, to every socket of that room, the sender
//! included. No JSON, no store, no history, no checks beyond framing. Any
//! other `GET` is answered `200` with the list of rooms seen (keep-alive),
//! anything else `404`. The load generator measures chatserver against what
//! this achieves under the same load, in the same run.
//!
//! Run: `PORT=0 HOST=127.0.0.1 cargo bench --bench floor`; it prints
//! `listening on 127.0.0.1:PORT` on stderr and serves until killed.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

const LISTENER: Token = Token(usize::MAX - 1);
/// Largest request head.
const MAX_HEAD: usize = 16 * 1024;
/// Largest frame accepted from a client.
const MAX_FRAME: usize = 1 << 20;
/// Unsent bytes after which a reader that does not keep up is dropped.
const MAX_BACKLOG: usize = 64 << 20;

enum State {
    /// Reading the request head (HTTP, maybe an upgrade).
    Http,
    Ws {
        room: usize,
        /// Index in the room's member list.
        slot: usize,
    },
}

struct Conn {
    sock: TcpStream,
    state: State,
    /// Bytes received but not yet a complete frame or head.
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    want_write: bool,
    dirty: bool,
    /// Drop once the output is sent.
    closing: bool,
}

struct Room {
    name: String,
    members: Vec<usize>,
}

struct Floor {
    poll: Poll,
    listener: TcpListener,
    paused: bool,
    conns: Slab<Conn>,
    rooms: Slab<Room>,
    by_name: HashMap<String, usize>,
    dirty: Vec<usize>,
    scratch: Vec<u8>,
}

fn main() {
    let host = std::env::var("HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "127.0.0.1".into());
    let port = std::env::var("PORT")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "0".into());
    let addr: SocketAddr = match format!("{host}:{port}").parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("floor: bad HOST/PORT: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(addr) {
        eprintln!("floor: {e}");
        std::process::exit(1);
    }
}

fn run(addr: SocketAddr) -> io::Result<()> {
    let poll = Poll::new()?;
    // A deep accept queue (mio's `bind` uses 128): a connect storm must not
    // be limited by dropped SYNs here.
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    sock.set_nonblocking(true)?;
    let mut listener = TcpListener::from_std(sock.into());
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    eprintln!("floor listening on {}", listener.local_addr()?);
    let mut f = Floor {
        poll,
        listener,
        paused: false,
        conns: Slab::with_capacity(1024),
        rooms: Slab::new(),
        by_name: HashMap::new(),
        dirty: Vec::new(),
        scratch: vec![0; 64 * 1024],
    };
    let mut events = Events::with_capacity(1024);
    loop {
        match f.poll.poll(&mut events, None) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            match ev.token() {
                LISTENER => f.accept(),
                Token(t) => {
                    if ev.is_writable() {
                        f.flush(t);
                    }
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        f.read(t);
                    }
                }
            }
        }
        let dirty = std::mem::take(&mut f.dirty);
        for t in &dirty {
            if let Some(c) = f.conns.get_mut(*t) {
                c.dirty = false;
                f.flush(*t);
            }
        }
        f.dirty = dirty;
        f.dirty.clear();
    }
}

impl Floor {
    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut sock, _)) => {
                    let _ = sock.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let t = entry.key();
                    if self
                        .poll
                        .registry()
                        .register(&mut sock, Token(t), Interest::READABLE)
                        .is_err()
                    {
                        continue;
                    }
                    entry.insert(Conn {
                        sock,
                        state: State::Http,
                        inbuf: Vec::new(),
                        out: Vec::new(),
                        out_pos: 0,
                        want_write: false,
                        dirty: false,
                        closing: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // Out of descriptors: stop polling the listener (it would
                    // stay readable and spin) until a connection closes.
                    eprintln!("floor: accept: {e}; pausing until a connection closes");
                    let _ = self.poll.registry().deregister(&mut self.listener);
                    self.paused = true;
                    return;
                }
            }
        }
    }

    fn drop_conn(&mut self, t: usize) {
        let Some(mut c) = self.conns.try_remove(t) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.sock);
        if let State::Ws { room, slot } = c.state {
            if let Some(r) = self.rooms.get_mut(room) {
                r.members.swap_remove(slot);
                if let Some(&moved) = r.members.get(slot) {
                    if let Some(State::Ws { slot: s, .. }) =
                        self.conns.get_mut(moved).map(|m| &mut m.state)
                    {
                        *s = slot;
                    }
                }
            }
        }
        if self.paused {
            self.paused = false;
            let _ = self
                .poll
                .registry()
                .register(&mut self.listener, LISTENER, Interest::READABLE);
            self.accept();
        }
    }

    fn mark_dirty(&mut self, t: usize) {
        if let Some(c) = self.conns.get_mut(t) {
            if !c.dirty && !c.want_write {
                c.dirty = true;
                self.dirty.push(t);
            }
        }
    }

    fn read(&mut self, t: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        while let Some(c) = self.conns.get_mut(t) {
            match c.sock.read(&mut scratch) {
                Ok(0) => {
                    self.drop_conn(t);
                    break;
                }
                Ok(n) => {
                    let keep_going = if c.inbuf.is_empty() {
                        let used = self.process(t, &scratch[..n]);
                        match used {
                            Some(u) if u < n => {
                                if let Some(c) = self.conns.get_mut(t) {
                                    c.inbuf.extend_from_slice(&scratch[u..n]);
                                }
                                true
                            }
                            Some(_) => true,
                            None => false,
                        }
                    } else {
                        c.inbuf.extend_from_slice(&scratch[..n]);
                        let buf = std::mem::take(&mut c.inbuf);
                        match self.process(t, &buf) {
                            Some(u) => {
                                if let Some(c) = self.conns.get_mut(t) {
                                    c.inbuf = if u < buf.len() {
                                        buf[u..].to_vec()
                                    } else {
                                        Vec::new()
                                    };
                                }
                                true
                            }
                            None => false,
                        }
                    };
                    if !keep_going {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_conn(t);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Handle what `data` holds for connection `t`; how many bytes were
    /// used, or `None` when the connection is gone or closing.
    fn process(&mut self, t: usize, data: &[u8]) -> Option<usize> {
        let mut at = 0;
        loop {
            let c = self.conns.get(t)?;
            if c.closing {
                return None;
            }
            let used = match c.state {
                State::Http => self.http(t, &data[at..])?,
                State::Ws { room, .. } => self.frame(t, room, &data[at..])?,
            };
            if used == 0 {
                return Some(at);
            }
            at += used;
        }
    }

    /// One request head; bytes used (0: incomplete).
    fn http(&mut self, t: usize, data: &[u8]) -> Option<usize> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let used = match req.parse(data) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if data.len() < MAX_HEAD => return Some(0),
            _ => {
                self.reply_close(t, "400 Bad Request");
                return None;
            }
        };
        let path = req.path.unwrap_or("/");
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        let upgrade = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket"));
        if let (Some(rest), true, Some(key)) = (
            path.strip_prefix("/ws/"),
            upgrade,
            header("sec-websocket-key"),
        ) {
            let name = rest.split('?').next().unwrap_or("").to_string();
            let accept = tungstenite::handshake::derive_accept_key(key);
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            let room = match self.by_name.get(&name) {
                Some(&r) => r,
                None => {
                    let r = self.rooms.insert(Room {
                        name: name.clone(),
                        members: Vec::new(),
                    });
                    self.by_name.insert(name, r);
                    r
                }
            };
            let members = &mut self.rooms[room].members;
            let slot = members.len();
            members.push(t);
            let c = self.conns.get_mut(t)?;
            c.state = State::Ws { room, slot };
            c.out.extend_from_slice(resp.as_bytes());
            self.mark_dirty(t);
            return Some(used);
        }
        let keep_alive = req.version == Some(1)
            && !header("connection").is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
        if req.method == Some("GET") && !upgrade {
            let mut body = String::from("[");
            for (i, (_, r)) in self.rooms.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&format!("{{\"name\":\"{}\"}}", r.name));
            }
            body.push(']');
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
                body.len(),
                if keep_alive { "" } else { "Connection: close\r\n" }
            );
            let c = self.conns.get_mut(t)?;
            c.out.extend_from_slice(resp.as_bytes());
            if !keep_alive {
                c.closing = true;
            }
            self.mark_dirty(t);
            return if keep_alive { Some(used) } else { None };
        }
        self.reply_close(t, "404 Not Found");
        None
    }

    fn reply_close(&mut self, t: usize, status: &str) {
        let body = "{\"error\":\"not here: this is the floor benchmark server\"}";
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        if let Some(c) = self.conns.get_mut(t) {
            c.out.extend_from_slice(resp.as_bytes());
            c.closing = true;
            self.mark_dirty(t);
        }
    }

    /// One client frame; bytes used (0: incomplete).
    fn frame(&mut self, t: usize, room: usize, b: &[u8]) -> Option<usize> {
        if b.len() < 2 {
            return Some(0);
        }
        let opcode = b[0] & 0x0f;
        let fin = b[0] & 0x80 != 0;
        if b[1] & 0x80 == 0 || !fin {
            // Unmasked or fragmented: not something our clients send.
            self.close_ws(t, 1002);
            return None;
        }
        let (len, mut at) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => {
                let mut l = [0u8; 8];
                l.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(l).min(u32::MAX as u64) as usize, 10)
            }
            126 | 127 => return Some(0),
            n => (n as usize, 2),
        };
        if len > MAX_FRAME {
            self.close_ws(t, 1009);
            return None;
        }
        if b.len() < at + 4 + len {
            return Some(0);
        }
        let key = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        at += 4;
        let payload = &b[at..at + len];
        let used = at + len;
        match opcode {
            0x1 | 0x2 => {
                let mut frame = Vec::with_capacity(len + 10);
                frame.push(0x80 | opcode);
                push_len(&mut frame, len);
                frame.extend(payload.iter().enumerate().map(|(i, x)| x ^ key[i & 3]));
                let mut slow = Vec::new();
                let Floor {
                    rooms,
                    conns,
                    dirty,
                    ..
                } = self;
                for &m in &rooms[room].members {
                    if let Some(c) = conns.get_mut(m) {
                        c.out.extend_from_slice(&frame);
                        if c.out.len() - c.out_pos > MAX_BACKLOG {
                            slow.push(m);
                        } else if !c.dirty && !c.want_write {
                            c.dirty = true;
                            dirty.push(m);
                        }
                    }
                }
                for m in slow {
                    self.drop_conn(m);
                }
            }
            0x8 => {
                let code = if len >= 2 {
                    u16::from_be_bytes([payload[0] ^ key[0], payload[1] ^ key[1]])
                } else {
                    1000
                };
                self.close_ws(t, code);
                return None;
            }
            0x9 => {
                let mut pong = vec![0x8a];
                push_len(&mut pong, len);
                pong.extend(payload.iter().enumerate().map(|(i, x)| x ^ key[i & 3]));
                if let Some(c) = self.conns.get_mut(t) {
                    c.out.extend_from_slice(&pong);
                }
                self.mark_dirty(t);
            }
            _ => {}
        }
        Some(used)
    }

    fn close_ws(&mut self, t: usize, code: u16) {
        if let Some(c) = self.conns.get_mut(t) {
            c.out.extend_from_slice(&[0x88, 2]);
            c.out.extend_from_slice(&code.to_be_bytes());
            c.closing = true;
            self.mark_dirty(t);
        }
    }

    fn flush(&mut self, t: usize) {
        let Some(c) = self.conns.get_mut(t) else {
            return;
        };
        while c.out_pos < c.out.len() {
            match c.sock.write(&c.out[c.out_pos..]) {
                Ok(0) => return self.drop_conn(t),
                Ok(n) => c.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.drop_conn(t),
            }
        }
        let drained = c.out_pos == c.out.len();
        if drained {
            if c.out.capacity() > 64 * 1024 {
                c.out = Vec::new();
            } else {
                c.out.clear();
            }
            c.out_pos = 0;
            if c.closing {
                return self.drop_conn(t);
            }
        }
        if drained == c.want_write {
            let interest = if drained {
                Interest::READABLE
            } else {
                Interest::READABLE | Interest::WRITABLE
            };
            if self
                .poll
                .registry()
                .reregister(&mut c.sock, Token(t), interest)
                .is_err()
            {
                return self.drop_conn(t);
            }
            c.want_write = !drained;
        }
    }
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 126 {
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}
