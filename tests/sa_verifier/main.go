// sa_verifier judges service-account tokens the way kube-apiserver does: with go-jose, against
// every public key of a --service-account-key-file bundle.  Usage: sa_verifier SA_PUB; tokens
// on stdin, one a line; for each it prints "ok" or "fail: <why>".
package main

import (
	"bufio"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"

	"gopkg.in/square/go-jose.v2/jwt"
)

func readKeys(path string) ([]interface{}, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var keys []interface{}
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		var key interface{}
		switch block.Type {
		case "PUBLIC KEY":
			key, err = x509.ParsePKIXPublicKey(block.Bytes)
		case "RSA PUBLIC KEY":
			key, err = x509.ParsePKCS1PublicKey(block.Bytes)
		default:
			err = fmt.Errorf("unexpected PEM block %q", block.Type)
		}
		if err != nil {
			return nil, err
		}
		keys = append(keys, key)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("%s: no public key", path)
	}
	return keys, nil
}

func verify(token string, keys []interface{}) error {
	tok, err := jwt.ParseSigned(token)
	if err != nil {
		return err
	}
	var claims jwt.Claims
	last := fmt.Errorf("no key")
	for _, key := range keys {
		if err := tok.Claims(key, &claims); err != nil {
			last = err
			continue
		}
		return nil
	}
	return last
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: sa_verifier SA_PUB < tokens")
		os.Exit(2)
	}
	keys, err := readKeys(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	for in.Scan() {
		if err := verify(in.Text(), keys); err != nil {
			fmt.Printf("fail: %v\n", err)
		} else {
			fmt.Println("ok")
		}
	}
}
