//! The response future: waits for the revocation store or the token resolver if they need time,
//! then drives the inner service's future inside the request's tracing span.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::ResponseBody;
use super::decision::Policy;
use crate::error::Rejection;
use crate::hooks::resolver::ResolveFuture;
use crate::hooks::revocation::RevocationCheck;
use crate::identity::{MatrixUser, TokenId};
use crate::macaroon::verify::Verified;

/// A request parked until an asynchronous answer, with the service that was driven ready.
pub(crate) struct Waiting<S, B> {
    pub(crate) service: S,
    pub(crate) parts: Parts,
    pub(crate) body: B,
    pub(crate) policy: Arc<Policy>,
    /// When the request was parked, for `matrix_auth_wait_seconds`.
    #[cfg(feature = "metrics")]
    pub(crate) since: std::time::Instant,
}

pin_project! {
    /// Response future of [`crate::MatrixAuth`].
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, S, B>,
        span: tracing::Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, S, B> {
        // Parked requests are boxed: only stores and resolvers that answer later get here.
        AwaitingRevocation {
            check: RevocationCheck,
            parked: Option<Box<(Verified, Waiting<S, B>)>>,
        },
        AwaitingResolver {
            resolving: ResolveFuture,
            parked: Option<Box<(TokenId, Waiting<S, B>)>>,
        },
        Called {
            #[pin]
            future: F,
        },
        Rejected {
            response: Option<Response<Bytes>>,
        },
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn called(future: S::Future, span: tracing::Span) -> Self {
        Self {
            state: State::Called { future },
            span,
        }
    }

    pub(crate) fn rejected(response: Response<Bytes>) -> Self {
        Self {
            state: State::Rejected {
                response: Some(response),
            },
            span: tracing::Span::none(),
        }
    }

    pub(crate) fn awaiting_revocation(
        check: RevocationCheck,
        verified: Verified,
        waiting: Waiting<S, B>,
    ) -> Self {
        Self {
            state: State::AwaitingRevocation {
                check,
                parked: Some(Box::new((verified, waiting))),
            },
            span: tracing::Span::none(),
        }
    }

    pub(crate) fn awaiting_resolver(
        resolving: ResolveFuture,
        token_id: TokenId,
        waiting: Waiting<S, B>,
    ) -> Self {
        Self {
            state: State::AwaitingResolver {
                resolving,
                parked: Some(Box::new((token_id, waiting))),
            },
            span: tracing::Span::none(),
        }
    }
}

/// The state after a parked request's verdict: the inner call, or the rejection.
fn resume<S, B>(
    verdict: Result<MatrixUser, Rejection>,
    waiting: Waiting<S, B>,
) -> (State<S::Future, S, B>, tracing::Span)
where
    S: Service<Request<B>>,
{
    let Waiting {
        mut service,
        parts,
        body,
        policy,
        ..
    } = waiting;
    let admitted = match verdict {
        Ok(user) => policy.admit(parts, body, Some(user)),
        Err(rejection) => {
            let response = Some(policy.refuse(&parts, &rejection));
            return (State::Rejected { response }, tracing::Span::none());
        }
    };
    match admitted {
        Ok((request, span)) => {
            let future = {
                let _entered = span.enter();
                service.call(request)
            };
            (State::Called { future }, span)
        }
        Err(rejection) => {
            let response = Some(policy.reject(&rejection));
            (State::Rejected { response }, tracing::Span::none())
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::AwaitingRevocation { check, parked } => {
                    let outcome = ready!(Pin::new(check).poll(cx));
                    let (verified, waiting) = *parked.take().expect("polled after completion");
                    #[cfg(feature = "metrics")]
                    crate::layer::metrics::waited(
                        crate::layer::metrics::Wait::Revocation,
                        waiting.since.elapsed(),
                    );
                    let verdict = waiting.policy.settle(outcome, verified, &waiting.parts);
                    let (next, span) = resume(verdict, waiting);
                    *this.span = span;
                    this.state.set(next);
                }
                StateProj::AwaitingResolver { resolving, parked } => {
                    let outcome = ready!(resolving.as_mut().poll(cx));
                    let (token_id, waiting) = *parked.take().expect("polled after completion");
                    #[cfg(feature = "metrics")]
                    crate::layer::metrics::waited(
                        crate::layer::metrics::Wait::Resolver,
                        waiting.since.elapsed(),
                    );
                    let verdict = waiting
                        .policy
                        .settle_resolved(outcome, token_id, &waiting.parts);
                    let (next, span) = resume(verdict, waiting);
                    *this.span = span;
                    this.state.set(next);
                }
                StateProj::Called { future } => {
                    let _entered = this.span.enter();
                    let response = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                }
                StateProj::Rejected { response } => {
                    let response = response.take().expect("polled after completion");
                    return Poll::Ready(Ok(response.map(ResponseBody::rejected)));
                }
            }
        }
    }
}
