// Command invitegen produces and checks Mattermost remote-cluster invite codes.
//
// The encryption and decryption code below is a port of
// RemoteClusterInvite.Encrypt / Decrypt / tryDecrypt from Mattermost's
// server/public/model/remote_cluster.go, and of the base64 handling in
// App.CreateRemoteClusterInvite / App.DecryptRemoteClusterInvite
// (server/channels/app/remote_cluster.go). Upstream uses crypto/pbkdf2 from
// Go >= 1.24; golang.org/x/crypto/pbkdf2 computes the same function.
//
// Usage:
//
//	invitegen gen                                   # print test vectors as JSON
//	INVITE_PASSWORD=... invitegen decrypt < invite  # print the invite's plaintext JSON
package main

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"os"
	"strings"

	"golang.org/x/crypto/pbkdf2"
	"golang.org/x/crypto/scrypt"
)

const (
	kdfPBKDF2 = "pbkdf2-sha256-600000"
	kdfScrypt = "scrypt-32768-8-1"

	// Alphabet of Mattermost's generated invite passwords.
	passwordAlphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!@#$%&*0123456789"
)

// RemoteClusterInvite mirrors model.RemoteClusterInvite.
type RemoteClusterInvite struct {
	RemoteId       string `json:"remote_id"`
	RemoteTeamId   string `json:"remote_team_id"` // Deprecated upstream, kept for compatibility.
	SiteURL        string `json:"site_url"`
	Token          string `json:"token"`
	RefreshedToken string `json:"refreshed_token,omitempty"`
	Version        int    `json:"version,omitempty"`
}

// idEncoding is the encoding used by model.NewId.
var idEncoding = base32.NewEncoding("ybndrfg8ejkmcpqxot1uwisza345h769").WithPadding(base32.NoPadding)

// newId mirrors model.NewId: a random (version 4) UUID encoded as 26 base32 chars.
func newId() string {
	b := make([]byte, 16)
	if _, err := io.ReadFull(rand.Reader, b); err != nil {
		panic(err)
	}
	b[6] = (b[6] & 0x0f) | 0x40
	b[8] = (b[8] & 0x3f) | 0x80
	return idEncoding.EncodeToString(b)
}

func randomPassword(n int) string {
	max := big.NewInt(int64(len(passwordAlphabet)))
	out := make([]byte, n)
	for i := range out {
		v, err := rand.Int(rand.Reader, max)
		if err != nil {
			panic(err)
		}
		out[i] = passwordAlphabet[v.Int64()]
	}
	return string(out)
}

func deriveKey(password string, salt []byte, usePBKDF2 bool) ([]byte, error) {
	if usePBKDF2 {
		return pbkdf2.Key([]byte(password), salt, 600000, 32, sha256.New), nil
	}
	return scrypt.Key([]byte(password), salt, 32768, 8, 1, 32)
}

// Encrypt is a port of RemoteClusterInvite.Encrypt. It also returns the
// plaintext so that it can be recorded in the vectors.
func (rci *RemoteClusterInvite) Encrypt(password string) (encrypted, raw []byte, err error) {
	raw, err = json.Marshal(&rci)
	if err != nil {
		return nil, nil, err
	}

	// create random salt to be prepended to the blob.
	salt := make([]byte, 16)
	if _, err = io.ReadFull(rand.Reader, salt); err != nil {
		return nil, nil, err
	}

	// PBKDF2 for version 3 and above, scrypt for older versions.
	key, err := deriveKey(password, salt, rci.Version >= 3)
	if err != nil {
		return nil, nil, err
	}

	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, nil, err
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		return nil, nil, err
	}

	// create random nonce
	nonce := make([]byte, gcm.NonceSize())
	if _, err = io.ReadFull(rand.Reader, nonce); err != nil {
		return nil, nil, err
	}

	// prefix the nonce to the ciphertext.
	sealed := gcm.Seal(nonce, nonce, raw, nil)
	return append(salt, sealed...), raw, nil
}

// Decrypt is a port of RemoteClusterInvite.Decrypt. It returns the decrypted
// plaintext and the KDF that worked.
func (rci *RemoteClusterInvite) Decrypt(encrypted []byte, password string) ([]byte, string, error) {
	if len(encrypted) <= 16 {
		return nil, "", errors.New("invalid length")
	}

	// first 16 bytes is the salt that was used to derive a key
	salt := encrypted[:16]
	encrypted = encrypted[16:]

	// Try PBKDF2 first (for version 3+)
	if plain, err := rci.tryDecrypt(encrypted, password, salt, true); err == nil {
		return plain, kdfPBKDF2, nil
	}

	// Fall back to scrypt (for older versions)
	plain, err := rci.tryDecrypt(encrypted, password, salt, false)
	if err != nil {
		return nil, "", err
	}
	return plain, kdfScrypt, nil
}

// tryDecrypt is a port of RemoteClusterInvite.tryDecrypt.
func (rci *RemoteClusterInvite) tryDecrypt(encrypted []byte, password string, salt []byte, usePBKDF2 bool) ([]byte, error) {
	key, err := deriveKey(password, salt, usePBKDF2)
	if err != nil {
		return nil, err
	}

	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}

	// Upstream slices without a bounds check (a blob of 17..27 bytes would
	// panic there); report it as an error instead.
	nonceSize := gcm.NonceSize()
	if len(encrypted) < nonceSize {
		return nil, errors.New("invalid length")
	}
	nonce, ciphertext := encrypted[:nonceSize], encrypted[nonceSize:]

	plain, err := gcm.Open(nil, nonce, ciphertext, nil)
	if err != nil {
		return nil, err
	}

	// upstream unmarshals the decrypted JSON into the invite struct; a
	// failure there also counts as a failed attempt.
	if err := json.Unmarshal(plain, &rci); err != nil {
		return nil, err
	}
	return plain, nil
}

type vector struct {
	Name      string `json:"name"`
	Password  string `json:"password"`
	Version   int    `json:"version"`
	KDF       string `json:"kdf"`
	Plaintext string `json:"plaintext"`
	Invite    string `json:"invite"`
}

type vectorFile struct {
	Vectors []vector `json:"vectors"`
}

func gen() error {
	cases := []struct {
		name     string
		password string
		invite   RemoteClusterInvite
	}{
		{
			name:     "v3-ascii-password",
			password: "correct horse battery staple",
			invite:   RemoteClusterInvite{RemoteId: newId(), SiteURL: "https://mm.example.com", Token: newId(), Version: 3},
		},
		{
			name:     "v3-non-ascii-password",
			password: "pässwörd-✓",
			invite:   RemoteClusterInvite{RemoteId: newId(), SiteURL: "https://chat.example.org", Token: newId(), Version: 3},
		},
		{
			name:     "v3-generated-password",
			password: randomPassword(16),
			invite:   RemoteClusterInvite{RemoteId: newId(), SiteURL: "https://mattermost.example.net", Token: newId(), Version: 3},
		},
		{
			name:     "v3-site-url-path-port",
			password: randomPassword(16),
			invite:   RemoteClusterInvite{RemoteId: newId(), SiteURL: "https://chat.example.com:8443/mm", Token: newId(), Version: 3},
		},
		{
			name:     "v2-scrypt",
			password: "v2-invite-password",
			invite:   RemoteClusterInvite{RemoteId: newId(), SiteURL: "https://old.example.com", Token: newId(), Version: 2},
		},
		{
			name:     "legacy-no-version-scrypt",
			password: "legacy password 123",
			invite:   RemoteClusterInvite{RemoteId: newId(), RemoteTeamId: newId(), SiteURL: "http://legacy.example.com:8065", Token: newId()},
		},
	}

	out := vectorFile{}
	for _, c := range cases {
		inv := c.invite
		encrypted, raw, err := inv.Encrypt(c.password)
		if err != nil {
			return fmt.Errorf("%s: %w", c.name, err)
		}
		kdf := kdfScrypt
		if inv.Version >= 3 {
			kdf = kdfPBKDF2
		}
		out.Vectors = append(out.Vectors, vector{
			Name:      c.name,
			Password:  c.password,
			Version:   inv.Version,
			KDF:       kdf,
			Plaintext: string(raw),
			Invite:    base64.URLEncoding.EncodeToString(encrypted),
		})
	}

	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		return err
	}
	_, err := os.Stdout.Write(buf.Bytes())
	return err
}

func decrypt() error {
	password, ok := os.LookupEnv("INVITE_PASSWORD")
	if !ok {
		return errors.New("INVITE_PASSWORD is not set")
	}
	in, err := io.ReadAll(os.Stdin)
	if err != nil {
		return err
	}
	// Same decoding as App.DecryptRemoteClusterInvite: padded URL-safe base64.
	decoded, err := base64.URLEncoding.DecodeString(strings.TrimSpace(string(in)))
	if err != nil {
		return fmt.Errorf("base64 decode: %w", err)
	}
	invite := &RemoteClusterInvite{}
	plain, _, err := invite.Decrypt(decoded, password)
	if err != nil {
		return fmt.Errorf("decrypt: %w", err)
	}
	_, err = fmt.Printf("%s\n", plain)
	return err
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: invitegen gen | invitegen decrypt  (invite on stdin, password in INVITE_PASSWORD)")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "gen":
		err = gen()
	case "decrypt":
		err = decrypt()
	default:
		fmt.Fprintf(os.Stderr, "unknown mode %q\n", os.Args[1])
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "invitegen:", err)
		os.Exit(1)
	}
}
