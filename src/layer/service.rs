//! The middleware service: hands each request to the decision pipeline, then on or back.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::request::Parts;
use http::{Request, Response};
use tower_service::Service;

use super::body::ResponseBody;
use super::decision::{Decision, Policy};
use super::future::{ResponseFuture, Waiting};

/// The service [`crate::MatrixAuthLayer`] wraps around an inner service.
#[derive(Clone, Debug)]
pub struct MatrixAuth<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S: Clone> MatrixAuth<S> {
    /// Parks a request until an asynchronous answer: the service that was driven ready goes
    /// into the future, a clone stays here.
    fn park<B>(&mut self, parts: Parts, body: B) -> Waiting<S, B> {
        let clone = self.inner.clone();
        Waiting {
            service: std::mem::replace(&mut self.inner, clone),
            parts,
            body,
            policy: self.policy.clone(),
            #[cfg(feature = "metrics")]
            since: std::time::Instant::now(),
        }
    }
}

impl<S> MatrixAuth<S> {
    pub(crate) fn new(inner: S, policy: Arc<Policy>) -> Self {
        Self { inner, policy }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for MatrixAuth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let (parts, body) = request.into_parts();
        match self.policy.decide(&parts) {
            Decision::Untouched => ResponseFuture::called(
                self.inner.call(Request::from_parts(parts, body)),
                tracing::Span::none(),
            ),
            Decision::Pass(user) => match self.policy.admit(parts, body, user) {
                Ok((request, span)) => {
                    let future = {
                        let _entered = span.enter();
                        self.inner.call(request)
                    };
                    ResponseFuture::called(future, span)
                }
                Err(rejection) => ResponseFuture::rejected(self.policy.reject(&rejection)),
            },
            Decision::Reject(rejection) => {
                ResponseFuture::rejected(self.policy.refuse(&parts, &rejection))
            }
            Decision::AwaitRevocation { check, verified } => {
                ResponseFuture::awaiting_revocation(check, verified, self.park(parts, body))
            }
            Decision::AwaitResolver {
                resolving,
                token_id,
            } => ResponseFuture::awaiting_resolver(resolving, token_id, self.park(parts, body)),
        }
    }
}
