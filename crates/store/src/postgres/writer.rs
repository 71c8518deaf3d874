//! Group commit for PostgreSQL: requests of every connection queue here, and a few writer
//! tasks each take what has queued (up to a batch's bound), write it in one transaction and
//! answer everyone after the commit. Under light load a request is written at once, alone;
//! under heavy load it waits for a writer, and the wait is what fills the batch, so the
//! number of transactions (and round trips) stops growing with the load.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::StoreError;

/// A request and where its answer goes.
pub struct Job<Req, Resp> {
    pub request: Req,
    reply: oneshot::Sender<Result<Resp, StoreError>>,
}

/// The queue in front of the writer tasks.
pub struct Writer<Req, Resp> {
    tx: mpsc::Sender<Job<Req, Resp>>,
}

impl<Req: Send + 'static, Resp: Send + 'static> Writer<Req, Resp> {
    /// Starts `writers` tasks (`name`: what they write, for metrics) that run `write` on batches of at most `max_weight` (a request
    /// weighs `weight(request)`, at least one request per batch). `capacity` requests may wait;
    /// more wait for room. `write` answers each request of its batch, in order; an error
    /// answers them all. The tasks end when the writer is dropped.
    pub fn start<W, F>(
        name: &'static str,
        writers: usize,
        capacity: usize,
        max_weight: usize,
        weight: fn(&Req) -> usize,
        write: W,
    ) -> Writer<Req, Resp>
    where
        W: Fn(Vec<Req>) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Vec<Result<Resp, StoreError>>, StoreError>> + Send,
    {
        let (tx, rx) = mpsc::channel::<Job<Req, Resp>>(capacity.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let write = Arc::new(write);
        for _ in 0..writers.max(1) {
            let rx = rx.clone();
            let write = write.clone();
            tokio::spawn(async move {
                while let Some(batch) = next_batch(&rx, max_weight, weight).await {
                    let (requests, replies): (Vec<Req>, Vec<_>) =
                        batch.into_iter().map(|j| (j.request, j.reply)).unzip();
                    metrics::histogram!("tern_store_batch_requests", "backend" => "postgres", "kind" => name)
                        .record(requests.len() as f64);
                    match write(requests).await {
                        Ok(answers) if answers.len() == replies.len() => {
                            for (reply, answer) in replies.into_iter().zip(answers) {
                                // The caller may have gone away; nothing to do then.
                                let _ = reply.send(answer);
                            }
                        }
                        Ok(_) => {
                            for reply in replies {
                                let _ = reply.send(Err(super::db_error(
                                    "a batch answered the wrong number of requests".into(),
                                )));
                            }
                        }
                        Err(e) => {
                            for reply in replies {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                }
            });
        }
        Writer { tx }
    }

    /// Queues `request` and waits for its answer (after its batch committed).
    pub async fn call(&self, request: Req) -> Result<Resp, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job { request, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// Waits for a request, then takes whatever else is queued, up to `max_weight`.
async fn next_batch<Req, Resp>(
    rx: &Mutex<mpsc::Receiver<Job<Req, Resp>>>,
    max_weight: usize,
    weight: fn(&Req) -> usize,
) -> Option<Vec<Job<Req, Resp>>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut total = weight(&first.request);
    let mut batch = vec![first];
    while total < max_weight {
        match rx.try_recv() {
            Ok(job) => {
                total += weight(&job.request);
                batch.push(job);
            }
            Err(_) => break,
        }
    }
    Some(batch)
}
