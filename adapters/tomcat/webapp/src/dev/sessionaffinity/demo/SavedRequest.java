package dev.sessionaffinity.demo;

import java.io.Serializable;
import java.util.Date;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

/**
 * Shaped like Spring Security's DefaultSavedRequest, which login pages keep
 * in the session: headers and parameters in TreeMaps that ignore case.
 */
public final class SavedRequest implements Serializable {

    private static final long serialVersionUID = 1L;

    final TreeMap<String, List<String>> headers = new TreeMap<>(String.CASE_INSENSITIVE_ORDER);
    final TreeMap<String, String[]> parameters = new TreeMap<>(String.CASE_INSENSITIVE_ORDER);
    final String redirectUrl;
    final Date savedAt = new Date();

    SavedRequest(String redirectUrl, Map<String, List<String>> headers, Map<String, String[]> parameters) {
        this.redirectUrl = redirectUrl;
        this.headers.putAll(headers);
        this.parameters.putAll(parameters);
    }
}
