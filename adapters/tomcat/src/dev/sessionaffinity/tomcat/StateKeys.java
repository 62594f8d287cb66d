package dev.sessionaffinity.tomcat;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.GeneralSecurityException;
import java.security.MessageDigest;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;

import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

/**
 * The HMAC-SHA256 keys that sign session state. The first key signs; every key
 * verifies, so a key can be rotated without refusing the states already stored.
 * A key written {@code verify:KEY} only verifies: rotation is two-phase, so no
 * pod ever meets a state signed with a key it does not have yet (add the new
 * key verify-only and roll; make it the signing key and roll; drop the old).
 *
 * <p>Keys come from a file (a mounted Kubernetes Secret) or an environment
 * variable: one or more keys separated by whitespace or commas, each at least
 * {@value #MIN_KEY_LENGTH} characters. Error messages name the source and
 * never the key.
 */
final class StateKeys {

    static final int MIN_KEY_LENGTH = 32;
    static final int MAC_LENGTH = 32;
    private static final String ALGORITHM = "HmacSHA256";

    static final String VERIFY_ONLY = "verify:";

    /** One initialized Mac per key, cloned for each use (a Mac is not thread-safe). */
    private final List<Mac> prototypes;
    private final Mac signer;

    private StateKeys(List<Mac> prototypes, Mac signer) {
        this.prototypes = prototypes;
        this.signer = signer;
    }

    /**
     * Keys from keyFile when it is set, else from the environment variable
     * named keyEnvironment.
     *
     * @throws IllegalArgumentException naming the attribute to fix
     */
    static StateKeys load(String keyFile, String keyEnvironment, Map<String, String> environment) {
        if (keyFile != null && !keyFile.isEmpty()) {
            String text;
            try {
                text = Files.readString(Path.of(keyFile), StandardCharsets.UTF_8);
            } catch (IOException | RuntimeException e) {
                throw new IllegalArgumentException("keyFile: cannot read " + keyFile + " (" + e.getClass().getSimpleName() + ")");
            }
            return parse(text, "keyFile " + keyFile);
        }
        String text = environment.get(keyEnvironment);
        if (text == null) {
            throw new IllegalArgumentException("keyEnvironment: the environment variable " + keyEnvironment
                    + " is not set; set it (or keyFile) to the state signing key(s)");
        }
        return parse(text, "environment variable " + keyEnvironment);
    }

    /** Keys separated by whitespace or commas; the first one not marked verify: signs. */
    static StateKeys parse(String text, String source) {
        List<Mac> macs = new ArrayList<>();
        Mac signer = null;
        for (String token : text.trim().split("[\\s,]+")) {
            if (token.isEmpty()) {
                continue;
            }
            boolean verifyOnly = token.startsWith(VERIFY_ONLY);
            String key = verifyOnly ? token.substring(VERIFY_ONLY.length()) : token;
            if (key.length() < MIN_KEY_LENGTH) {
                throw new IllegalArgumentException(source + ": key " + (macs.size() + 1) + " has " + key.length()
                        + " characters; use at least " + MIN_KEY_LENGTH + " random characters");
            }
            Mac mac = mac(key.getBytes(StandardCharsets.UTF_8));
            macs.add(mac);
            if (signer == null && !verifyOnly) {
                signer = mac;
            }
        }
        if (macs.isEmpty()) {
            throw new IllegalArgumentException(source + ": holds no key");
        }
        if (signer == null) {
            throw new IllegalArgumentException(source + ": holds no signing key (every key is marked " + VERIFY_ONLY + ")");
        }
        return new StateKeys(List.copyOf(macs), signer);
    }

    /** HMAC-SHA256 of data[0, length) with the signing key. */
    byte[] sign(byte[] data, int length) {
        return compute(signer, data, length);
    }

    /** True if mac is the HMAC of data[0, length) under any key (constant-time compare). */
    boolean verify(byte[] data, int length, byte[] mac) {
        boolean valid = false;
        for (Mac prototype : prototypes) {
            valid |= MessageDigest.isEqual(compute(prototype, data, length), mac);
        }
        return valid;
    }

    private static byte[] compute(Mac prototype, byte[] data, int length) {
        Mac mac;
        try {
            mac = (Mac) prototype.clone();
        } catch (CloneNotSupportedException e) {
            throw new IllegalStateException("HmacSHA256 provider does not support clone()", e);
        }
        mac.update(data, 0, length);
        return mac.doFinal();
    }

    private static Mac mac(byte[] key) {
        try {
            Mac mac = Mac.getInstance(ALGORITHM);
            mac.init(new SecretKeySpec(key, ALGORITHM));
            return mac;
        } catch (GeneralSecurityException e) {
            throw new IllegalStateException("HmacSHA256 is not available", e);
        }
    }
}
