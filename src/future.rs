//! The response future: waits for the revocation answer if the store needs time, then drives
//! the inner service's future inside the request's tracing span.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::layer::Config;
use crate::revocation::RevocationCheck;
use crate::service::{settle, Allowances};
use crate::verify::Verified;

/// A request whose token verified, parked until the revocation store answers.
pub(crate) struct Waiting<S, B> {
    pub(crate) service: S,
    pub(crate) parts: Parts,
    pub(crate) body: B,
    pub(crate) verified: Verified,
    pub(crate) allowed: Allowances,
    pub(crate) config: Arc<Config>,
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
        AwaitingRevocation {
            check: RevocationCheck,
            // Boxed: only stores that answer asynchronously get here.
            waiting: Option<Box<Waiting<S, B>>>,
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

    pub(crate) fn awaiting_revocation(check: RevocationCheck, waiting: Waiting<S, B>) -> Self {
        Self {
            state: State::AwaitingRevocation {
                check,
                waiting: Some(Box::new(waiting)),
            },
            span: tracing::Span::none(),
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
                StateProj::AwaitingRevocation { check, waiting } => {
                    let outcome = ready!(Pin::new(check).poll(cx));
                    let Waiting {
                        mut service,
                        parts,
                        body,
                        verified,
                        allowed,
                        config,
                    } = *waiting.take().expect("polled after completion");
                    match settle(outcome, verified, allowed) {
                        Ok(user) => {
                            let (request, span) = config.admit(parts, body, Some(user));
                            let future = {
                                let _entered = span.enter();
                                service.call(request)
                            };
                            *this.span = span;
                            this.state.set(State::Called { future });
                        }
                        Err(rejection) => {
                            let response = Some(config.reject(&rejection));
                            this.state.set(State::Rejected { response });
                        }
                    }
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
