//! A real DNS server for the resolver tests: UDP on 127.0.0.1:0, answering
//! A and AAAA queries from a table the test changes while the gateway
//! runs, or failing a name (SERVFAIL) to test a lookup failure.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};

#[derive(Clone)]
enum Answer {
    Addresses(Vec<IpAddr>),
    Fail,
    /// The A query answers; the AAAA query fails.
    FailV6(Vec<IpAddr>),
}

#[derive(Default)]
struct Table {
    names: Mutex<HashMap<String, Answer>>,
    queries: AtomicUsize,
    stop: AtomicBool,
}

pub struct TestDns {
    pub addr: SocketAddr,
    table: Arc<Table>,
}

impl TestDns {
    pub fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the DNS server");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let table = Arc::new(Table::default());
        let serving = Arc::clone(&table);
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !serving.stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(answer) = answer(&serving, &buf[..n]) {
                    let _ = socket.send_to(&answer, from);
                }
            }
        });
        TestDns { addr, table }
    }

    /// `name` resolves to `addrs` (IPv4 and IPv6 alike) from now on.
    pub fn set(&self, name: &str, addrs: &[&str]) {
        let addrs = addrs.iter().map(|a| a.parse().unwrap()).collect();
        self.table
            .names
            .lock()
            .unwrap()
            .insert(key(name), Answer::Addresses(addrs));
    }

    /// Lookups of `name` fail (SERVFAIL) from now on.
    pub fn fail(&self, name: &str) {
        self.table
            .names
            .lock()
            .unwrap()
            .insert(key(name), Answer::Fail);
    }

    /// `name`'s AAAA lookups fail from now on; its A records stay `addrs`.
    pub fn fail_v6(&self, name: &str, addrs: &[&str]) {
        let addrs = addrs.iter().map(|a| a.parse().unwrap()).collect();
        self.table
            .names
            .lock()
            .unwrap()
            .insert(key(name), Answer::FailV6(addrs));
    }

    pub fn queries(&self) -> usize {
        self.table.queries.load(Ordering::SeqCst)
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.table.stop.store(true, Ordering::Relaxed);
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn answer(table: &Table, packet: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(packet).ok()?;
    table.queries.fetch_add(1, Ordering::SeqCst);
    let question = query.queries.first()?.clone();
    let found = table
        .names
        .lock()
        .unwrap()
        .get(&key(&question.name().to_string()))
        .cloned();
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    reply.add_query(question.clone());
    match found {
        None => reply.metadata.response_code = ResponseCode::NXDomain,
        Some(Answer::Fail) => reply.metadata.response_code = ResponseCode::ServFail,
        Some(Answer::FailV6(_)) if question.query_type() == RecordType::AAAA => {
            reply.metadata.response_code = ResponseCode::ServFail
        }
        Some(Answer::Addresses(addrs) | Answer::FailV6(addrs)) => {
            for ip in addrs {
                let data = match (ip, question.query_type()) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
                    _ => continue,
                };
                // A TTL of 1s: the gateway asks again at its own interval.
                reply.add_answer(Record::from_rdata(question.name().clone(), 1, data));
            }
        }
    }
    reply.to_vec().ok()
}
