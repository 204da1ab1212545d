package authmail

// consoleSchemas are the document's schemas of the console endpoints.
func consoleSchemas() oaJ { return oaJ{} }

// consoleOperation documents a console endpoint; false for an unknown
// kind.
func consoleOperation(e *endpoint, op, ok oaJ, errs errorCodes, params *[]any) bool {
	return false
}
