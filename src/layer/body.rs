//! The response body: the inner service's body untouched, or the bytes of our Matrix error.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// Either the inner service's body, passed through without boxing or copying, or the JSON
    /// error of a rejected request.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        inner: Inner<B>,
    }
}

pin_project! {
    #[project = InnerProj]
    #[derive(Debug)]
    enum Inner<B> {
        Passed { #[pin] body: B },
        Rejected { bytes: Option<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            inner: Inner::Passed { body },
        }
    }

    pub(crate) fn rejected(bytes: Bytes) -> Self {
        Self {
            inner: Inner::Rejected {
                bytes: (!bytes.is_empty()).then_some(bytes),
            },
        }
    }

    /// The body as the inner service's own body type: a passed body as it came, the rejection's
    /// JSON through `B::from`.
    ///
    /// For routers that box every response body of another type, as axum does: mapping the
    /// layer's responses with this spares each passed request that allocation (and the dynamic
    /// dispatch of every poll of its body); only rejections are converted. See the homeserver
    /// example, which wraps its routes in `MatrixAuthLayer` this way.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower_matrix_auth::layer::ResponseBody;
    ///
    /// fn unwrap(response: http::Response<ResponseBody<Full<Bytes>>>) -> http::Response<Full<Bytes>> {
    ///     response.map(ResponseBody::into_inner_type)
    /// }
    /// ```
    pub fn into_inner_type(self) -> B
    where
        B: From<Bytes>,
    {
        match self.inner {
            Inner::Passed { body } => body,
            Inner::Rejected { bytes } => B::from(bytes.unwrap_or_default()),
        }
    }

    /// Whether this is the layer's own error body.
    pub fn is_rejection(&self) -> bool {
        matches!(self.inner, Inner::Rejected { .. })
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().inner.project() {
            InnerProj::Passed { body } => body.poll_frame(cx),
            InnerProj::Rejected { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Passed { body } => body.is_end_stream(),
            Inner::Rejected { bytes } => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Passed { body } => body.size_hint(),
            Inner::Rejected { bytes } => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    async fn bytes_of(body: Full<Bytes>) -> Bytes {
        body.collect().await.expect("infallible").to_bytes()
    }

    #[tokio::test]
    async fn into_inner_type_hands_back_a_passed_body_and_converts_a_rejection() {
        let passed = ResponseBody::inner(Full::new(Bytes::from_static(b"inner")));
        assert!(!passed.is_rejection());
        assert_eq!(bytes_of(passed.into_inner_type()).await, "inner");

        let json = Bytes::from_static(br#"{"errcode":"M_MISSING_TOKEN"}"#);
        let rejected = ResponseBody::<Full<Bytes>>::rejected(json.clone());
        assert!(rejected.is_rejection());
        assert_eq!(bytes_of(rejected.into_inner_type()).await, json);

        // An empty rejection (a HEAD answer, say) stays empty.
        let empty = ResponseBody::<Full<Bytes>>::rejected(Bytes::new());
        assert_eq!(bytes_of(empty.into_inner_type()).await, "");
    }
}
