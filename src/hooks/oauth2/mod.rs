//! OAuth 2.0 delegated authentication (feature `oauth2`): tokens issued by an OAuth 2.0 server
//! such as the Matrix Authentication Service, checked by RFC 7662 introspection.
//!
//! | File | What it holds |
//! |---|---|
//! | `mod.rs` | [`Introspection`], the resolver and its configuration; the look-up: cache, flight, request |
//! | `auth.rs` | [`ClientAuth`]: MAS's shared secret, `client_secret_basic` |
//! | `answer.rs` | what an answer means: scopes, user, device, expiry; refused or broken |
//! | `cache.rs` | the cache keyed by SHA-256, single-flight, invalidation |
//! | `transport.rs` | hyper 1 (plain HTTP) or any tower service |

mod answer;
mod auth;
mod cache;
mod transport;

pub use auth::ClientAuth;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body::Body;
use http_body_util::Full;
use percent_encoding::utf8_percent_encode;
use tokio::sync::Semaphore;
use tower_service::Service;

use crate::hooks::clock::{Clock, SystemClock};
use crate::hooks::resolver::{ResolveFuture, ResolvedToken, TokenResolver};
use crate::hooks::revocation::BackendError;
use answer::{Answer, Mapping};
use cache::{Cache, Key, Outcome};
use transport::{BoxError, ServiceTransport, Transport};

/// The default cache lifetime of an active answer: 2 minutes, as Synapse caches MAS's answers.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(120);
/// The default bound on cached answers.
pub const DEFAULT_CACHE_CAPACITY: usize = 100_000;
/// The default deadline of one introspection, the wait for a free slot included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default bound on introspection requests in flight at once.
pub const DEFAULT_MAX_CONCURRENT: usize = 64;

/// The header MAS reads to put the device in a `device_id` field (a compatibility session's
/// device id may not fit in a scope).
const MAS_DEVICE_ID_HEADER: &str = "x-mas-supports-device-id";

#[derive(Clone)]
struct Config {
    endpoint: Uri,
    auth: ClientAuth,
    mapping: Mapping,
    ttl: Duration,
    capacity: usize,
    timeout: Duration,
    max_concurrent: usize,
    clock: Arc<dyn Clock>,
    transport: Arc<dyn Transport>,
}

/// What a configuration's look-ups share: the cache, the flights, the slots.
struct State {
    cache: Cache,
    slots: Semaphore,
}

impl State {
    fn new(config: &Config) -> Self {
        Self {
            cache: Cache::new(config.capacity),
            slots: Semaphore::new(config.max_concurrent.clamp(1, Semaphore::MAX_PERMITS)),
        }
    }
}

#[doc = include_str!("../../../docs/oauth2.md")]
#[cfg_attr(docsrs, doc(cfg(feature = "oauth2")))]
#[derive(Clone)]
#[must_use = "a configuration unused configures nothing: builder methods return the configured value"]
pub struct Introspection {
    config: Arc<Config>,
    state: Arc<State>,
}

impl Introspection {
    /// A resolver asking `endpoint` (e.g. MAS's `http://mas:8080/oauth2/introspect`) with
    /// hyper 1, for users of `server_name` (a `username` of `alice` is `@alice:<server_name>`).
    /// No client authentication until [`Self::client_auth`].
    ///
    /// Plain HTTP; with the feature `oauth2-rustls`, HTTPS too (rustls with ring, the system's
    /// root certificates). Look-ups need a tokio runtime (with its time driver), as hyper's
    /// client does. For a proxy, mTLS or other roots, hand in a client with
    /// [`Self::with_service`].
    pub fn new(endpoint: Uri, server_name: impl Into<String>) -> Self {
        Self::with_transport(endpoint, server_name, Arc::new(transport::hyper_client()))
    }

    /// A resolver sending its requests through `service`: any tower service taking
    /// `http::Request<Full<Bytes>>` (the homeserver's own HTTP client, with its TLS, proxy,
    /// mTLS), cloned for each request. Its answer body is read up to 64 KiB.
    pub fn with_service<S, B>(endpoint: Uri, server_name: impl Into<String>, service: S) -> Self
    where
        S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        Self::with_transport(
            endpoint,
            server_name,
            Arc::new(ServiceTransport { service }),
        )
    }

    fn with_transport(
        endpoint: Uri,
        server_name: impl Into<String>,
        transport: Arc<dyn Transport>,
    ) -> Self {
        let server_name: String = server_name.into();
        let config = Config {
            endpoint,
            auth: ClientAuth::none(),
            mapping: Mapping {
                server_name: server_name.into(),
                from_sub: None,
            },
            ttl: DEFAULT_CACHE_TTL,
            capacity: DEFAULT_CACHE_CAPACITY,
            timeout: DEFAULT_TIMEOUT,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            clock: Arc::new(SystemClock),
            transport,
        };
        Self {
            state: Arc::new(State::new(&config)),
            config: Arc::new(config),
        }
    }

    /// Every builder method starts a fresh cache, so clones configured apart share nothing.
    fn update(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(Arc::make_mut(&mut self.config));
        self.state = Arc::new(State::new(&self.config));
        self
    }

    /// How the homeserver authenticates to the endpoint (default: not at all).
    pub fn client_auth(self, auth: ClientAuth) -> Self {
        self.update(|c| c.auth = auth)
    }

    /// How long an active answer is reused (default [`DEFAULT_CACHE_TTL`], 2 minutes); never
    /// past the token's `exp`. `Duration::ZERO` asks the endpoint on every request.
    pub fn cache_ttl(self, ttl: Duration) -> Self {
        self.update(|c| c.ttl = ttl)
    }

    /// At most this many cached answers (default [`DEFAULT_CACHE_CAPACITY`]); `0` caches
    /// nothing (concurrent look-ups of one token are still merged).
    pub fn cache_capacity(self, capacity: usize) -> Self {
        self.update(|c| c.capacity = capacity)
    }

    /// How long one introspection may take, waiting for a free slot included (default
    /// [`DEFAULT_TIMEOUT`]); past it the request gets `503 M_UNKNOWN`.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.update(|c| c.timeout = timeout)
    }

    /// At most this many introspection requests at once (default [`DEFAULT_MAX_CONCURRENT`],
    /// at least 1); others wait for a slot, within [`Self::timeout`].
    pub fn max_concurrent(self, max: usize) -> Self {
        self.update(|c| c.max_concurrent = max)
    }

    /// Names the user from the answer's `sub` claim instead of `username` (for a server whose
    /// `username` is no Matrix localpart): `map` returns the full user id, or `None` to refuse
    /// the token (`401 M_UNKNOWN_TOKEN`).
    pub fn user_from_sub<F>(self, map: F) -> Self
    where
        F: Fn(&str) -> Option<String> + Send + Sync + 'static,
    {
        self.update(|c| c.mapping.from_sub = Some(Arc::new(map)))
    }

    /// The clock for cache lifetimes (default: the system's). Give the layer's verifier the
    /// same one, since the layer checks `exp` with it.
    pub fn clock(self, clock: impl Clock) -> Self {
        self.update(|c| c.clock = Arc::new(clock))
    }

    /// Forgets the cached answer for `token` (a logout of that token). Returns whether one was
    /// cached. Look-ups of it already in flight store nothing.
    pub fn invalidate_token(&self, token: &str) -> bool {
        let key = cache::key(token);
        self.state.cache.invalidate(|k, _| *k == key) > 0
    }

    /// Forgets the cached answer for the token `user` authenticated with (a logout handler has
    /// the [`MatrixUser`](crate::MatrixUser), not the token). Returns whether one was cached.
    pub fn invalidate(&self, user: &crate::MatrixUser) -> bool {
        let token_id = user.token_id();
        self.state.cache.invalidate(|_, r| {
            r.identity
                .as_ref()
                .is_some_and(|u| u.token_id() == token_id)
        }) > 0
    }

    /// Forgets every cached answer for this device of this user (a device deleted, or
    /// logged out through the token server). Returns how many.
    pub fn invalidate_device(&self, user_id: &str, device_id: &str) -> usize {
        self.state
            .cache
            .invalidate(|_, r| r.user_id == user_id && r.device_id.as_deref() == Some(device_id))
    }

    /// Forgets every cached answer for this user (log out everywhere, a deactivation, a lock).
    /// Returns how many.
    pub fn invalidate_user(&self, user_id: &str) -> usize {
        self.state.cache.invalidate(|_, r| r.user_id == user_id)
    }

    /// Forgets every cached answer.
    pub fn clear_cache(&self) {
        self.state.cache.invalidate(|_, _| true);
    }

    /// How many answers are cached now.
    pub fn cached_answers(&self) -> usize {
        self.state.cache.len()
    }

    /// The request to the endpoint: RFC 7662 §2.1, with MAS's device-id header.
    fn request(&self, token: &str) -> Request<Full<Bytes>> {
        let body = format!(
            "token={}&token_type_hint=access_token",
            utf8_percent_encode(token, auth::FORM)
        );
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.config.endpoint.clone();
        let headers = request.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(MAS_DEVICE_ID_HEADER, HeaderValue::from_static("1"));
        if let Some(authorization) = self.config.auth.header() {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        request
    }

    /// One introspection, bounded by the slots and the timeout, its answer read and (if
    /// active) cached.
    async fn introspect(&self, key: Key, token: &str) -> Outcome {
        let generation = self.state.cache.generation();
        let exchange = async {
            let _slot = self
                .state
                .slots
                .acquire()
                .await
                .map_err(|e| -> BoxError { Box::new(e) })?;
            self.config.transport.send(self.request(token)).await
        };
        let (status, body) = match tokio::time::timeout(self.config.timeout, exchange).await {
            Err(_) => return Err("the introspection endpoint did not answer in time".into()),
            // The transport's error names the endpoint at most, never the token (which is in
            // the body).
            Ok(Err(error)) => {
                return Err(format!("the introspection request failed: {error}").into())
            }
            Ok(Ok(answer)) => answer,
        };
        if !status.is_success() {
            return Err(format!("the introspection endpoint answered {status}").into());
        }
        match answer::read(&body, &self.config.mapping) {
            Answer::Broken(why) => Err(why.into()),
            Answer::Refused(why) => {
                tracing::debug!(reason = why.describe(), "introspection refused the token");
                Ok(None)
            }
            Answer::Active(resolved) => {
                let resolved = resolved.prepared_for(token);
                let now = self.config.clock.now_ms();
                let ttl_ms = u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX);
                let until = now
                    .saturating_add(ttl_ms)
                    .min(resolved.expires_at_ms.unwrap_or(u64::MAX));
                self.state
                    .cache
                    .insert(key, resolved.clone(), until, now, generation);
                Ok(Some(resolved))
            }
        }
    }

    /// A look-up that missed the cache: join (or start) the token's flight.
    async fn look_up(self, key: Key, token: String) -> Result<Option<ResolvedToken>, BackendError> {
        let guard = self.state.cache.join(key);
        let outcome = guard
            .flight
            .get_or_init(|| self.introspect(key, &token))
            .await
            .clone();
        drop(guard);
        outcome.map_err(|why| BackendError::new(IntrospectionError(why)))
    }
}

impl TokenResolver for Introspection {
    fn resolve(&self, token: &str) -> ResolveFuture {
        let key = cache::key(token);
        if let Some(hit) = self.state.cache.get(&key, self.config.clock.now_ms()) {
            return Box::pin(std::future::ready(Ok(Some(hit))));
        }
        Box::pin(self.clone().look_up(key, token.to_owned()))
    }

    /// A cache hit: one SHA-256 of the token, one lock, one map look-up.
    fn resolve_now(&self, token: &str) -> Option<Arc<ResolvedToken>> {
        self.state
            .cache
            .get_shared(&cache::key(token), self.config.clock.now_ms())
    }
}

/// Why an introspection could not say whether a token is active (never the token).
#[derive(Debug)]
struct IntrospectionError(Arc<str>);

impl fmt::Display for IntrospectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IntrospectionError {}

impl fmt::Debug for Introspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The endpoint without any `user:password@` it may carry.
        let endpoint = &self.config.endpoint;
        let host = endpoint.host().unwrap_or("");
        let endpoint = format!(
            "{}://{host}{}{}",
            endpoint.scheme_str().unwrap_or("http"),
            endpoint.port().map(|p| format!(":{p}")).unwrap_or_default(),
            endpoint.path()
        );
        f.debug_struct("Introspection")
            .field("endpoint", &endpoint)
            .field("client_auth", &self.config.auth)
            .field("server_name", &self.config.mapping.server_name)
            .field("user_from_sub", &self.config.mapping.from_sub.is_some())
            .field("cache_ttl", &self.config.ttl)
            .field("cache_capacity", &self.config.capacity)
            .field("cached_answers", &self.state.cache.len())
            .field("timeout", &self.config.timeout)
            .field("max_concurrent", &self.config.max_concurrent)
            .finish_non_exhaustive()
    }
}
