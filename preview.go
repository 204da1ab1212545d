package authmail

import "net/http"

const (
	kindPreview endpointKind = 110 + iota
	kindPreviewFile
)

var (
	previewEndpoint     = &endpoint{path: "/preview", flow: "preview", kind: kindPreview, perm: "preview"}
	previewFileEndpoint = &endpoint{path: "/preview/{file}", flow: "preview", kind: kindPreviewFile, perm: "preview"}
)

func (h *Handler) servePreview(w http.ResponseWriter, r *http.Request, rc *requestCtx, ep *endpoint, key *apiKey, arg string) error {
	return h.reject(w, rc, &apiError{Status: http.StatusNotFound, Code: "not_found", Message: "no such endpoint"})
}

func previewOperation(e *endpoint, op, ok oaJ, errs errorCodes, params *[]any) bool { return false }
