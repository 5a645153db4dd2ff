//! Seeding: rooms created and given history before a scenario measures
//! anything, so that a join reads history as a real client's does.
//!
//! Called by the coordinator of every scenario but login (idle, fanout,
//! many, rest) before its workers connect.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::sys::runtime;
use crate::ws_client::{self, field_str, ws_path, OP_CLOSE, OP_TEXT};
use crate::CONTENT;

/// Seed every room with `n` messages (which also creates it), 32 rooms at a
/// time; returns when every seed came back to its sender.
pub fn seed_rooms(addr: SocketAddr, rooms: &[String], n: u32) -> Result<(), String> {
    if rooms.is_empty() || n == 0 {
        return Ok(());
    }
    let t0 = Instant::now();
    let rt = runtime();
    let local = tokio::task::LocalSet::new();
    let res: Result<(), String> = local.block_on(&rt, async {
        let sem = Rc::new(Semaphore::new(32));
        let mut handles = Vec::new();
        for room in rooms {
            let room = room.clone();
            let sem = sem.clone();
            handles.push(tokio::task::spawn_local(async move {
                let _p = sem.acquire().await;
                tokio::time::timeout(Duration::from_secs(30), seed_one(addr, &room, n))
                    .await
                    .unwrap_or_else(|_| Err(format!("seeding room {room} timed out")))
            }));
        }
        for h in handles {
            h.await.map_err(|e| e.to_string())??;
        }
        Ok(())
    });
    res?;
    eprintln!(
        "  seeded {} rooms with {n} messages each in {:.1}s",
        rooms.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One room: `n` messages from `seeder`, then wait for all of them to come back.
async fn seed_one(addr: SocketAddr, room: &str, n: u32) -> Result<(), String> {
    let mut c = ws_client::connect(addr, &ws_path(room, "seeder"))
        .await
        .map_err(|e| format!("seed {room}: {e}"))?;
    for i in 0..n {
        let text = format!(
            "{{\"content\":\"seed {i}: a line of history, about as long as a chat message\"}}"
        );
        c.send_text(&text).await.map_err(|e| e.to_string())?;
    }
    let mut got = 0;
    while got < n {
        while let Some(f) = c.next_frame().map_err(|e| e.to_string())? {
            match f.opcode {
                OP_TEXT
                    if field_str(f.payload, CONTENT).is_some_and(|c| c.starts_with(b"seed ")) =>
                {
                    got += 1;
                }
                OP_CLOSE => return Err(format!("seed {room}: closed ({:?})", c.close_code)),
                _ => {}
            }
        }
        if got >= n {
            break;
        }
        if c.fill().await.map_err(|e| e.to_string())? == 0 {
            return Err(format!("seed {room}: connection closed"));
        }
    }
    let _ = c.close(1000).await;
    Ok(())
}
