package dev.sessionaffinity.tomcat;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InvalidClassException;
import java.io.NotSerializableException;
import java.io.ObjectInputFilter;
import java.io.ObjectInputStream;
import java.io.ObjectOutputStream;
import java.io.Serializable;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.SortedMap;
import java.util.TreeMap;
import java.util.regex.Pattern;

import jakarta.servlet.http.HttpSession;

import org.apache.catalina.Manager;
import org.apache.catalina.util.CustomObjectInputStream;
import org.apache.juli.logging.Log;
import org.apache.juli.logging.LogFactory;

import dev.sessionaffinity.tomcat.RestoreRefused.Reason;

/**
 * Session attributes in Java serialization form: one stream, names sorted, so
 * the same attributes give the same bytes and a hash of them detects changes
 * made inside stored objects.
 *
 * <p>Reading resolves classes with the web app's class loader and only if
 * their names match the allow-list, before any object is created.
 */
final class Attributes {

    private static final Log log = LogFactory.getLog(Attributes.class);
    /** Deeper object graphs than this are refused on read (a stack-exhaustion guard). */
    private static final int MAX_DEPTH = 200;

    /** What write() produced: the bytes, and the attributes left out because they cannot be serialized. */
    static final class Written {
        final byte[] bytes;
        final List<String> skipped;

        Written(byte[] bytes, List<String> skipped) {
            this.bytes = bytes;
            this.skipped = skipped;
        }
    }

    private Attributes() {
    }

    /**
     * The session's attributes that can travel: Serializable, and distributable
     * under the Manager's attribute filters (if any are configured).
     *
     * @throws IOException if an attribute fails to serialize for another reason
     *         than not being Serializable (e.g. it changed while being written);
     *         nothing should be sent then
     */
    static Written write(HttpSession session, Manager manager) throws IOException {
        SortedMap<String, Object> values = new TreeMap<>();
        for (String name : Collections.list(session.getAttributeNames())) {
            Object value = session.getAttribute(name);
            if (value != null && manager.willAttributeDistribute(name, value)) {
                values.put(name, value);
            }
        }
        return write(values);
    }

    /** The values that can be serialized, in name order, and the names of those that cannot. */
    static Written write(SortedMap<String, Object> attributes) throws IOException {
        Map<String, Object> values = new LinkedHashMap<>();
        List<String> skipped = new ArrayList<>();
        attributes.forEach((name, value) -> {
            if (value instanceof Serializable) {
                values.put(name, value);
            } else {
                skipped.add(name);
            }
        });
        try {
            return new Written(serialize(values), skipped);
        } catch (NotSerializableException e) {
            // Something nested inside a Serializable attribute is not: find which attributes, leave them out.
            for (Map.Entry<String, Object> entry : List.copyOf(values.entrySet())) {
                if (size(entry.getKey(), entry.getValue()) < 0) {
                    values.remove(entry.getKey());
                    skipped.add(entry.getKey());
                }
            }
            return new Written(serialize(values), skipped);
        }
    }

    /** The values read back from write()'s bytes, in name order. */
    static Map<String, Object> read(byte[] bytes, ClassLoader loader, Pattern allowedClasses) throws RestoreRefused {
        // Tomcat's stream checks each class name (and proxy interface) against the allow-list before loading
        // it, and logs each refused class once.
        try (ObjectInputStream in = new CustomObjectInputStream(new ByteArrayInputStream(bytes), loader, log,
                allowedClasses, true)) {
            // No array may claim more elements than the stream has bytes: no huge allocation from a small state.
            in.setObjectInputFilter(info -> info.arrayLength() > bytes.length || info.depth() > MAX_DEPTH
                    ? ObjectInputFilter.Status.REJECTED : ObjectInputFilter.Status.UNDECIDED);
            int count = in.readInt();
            if (count < 0 || count > bytes.length) {
                throw new RestoreRefused(Reason.MALFORMED, "attribute count " + count);
            }
            Map<String, Object> values = new LinkedHashMap<>();
            for (int i = 0; i < count; i++) {
                String name = in.readUTF();
                values.put(name, in.readObject());
            }
            if (in.read() != -1) {
                throw new RestoreRefused(Reason.MALFORMED, "data after the attributes");
            }
            return values;
        } catch (InvalidClassException | ClassNotFoundException e) {
            String message = String.valueOf(e.getMessage());
            throw new RestoreRefused(Reason.CLASS_NOT_ALLOWED, message.length() > 160 ? message.substring(0, 160) + "..." : message);
        } catch (IOException | RuntimeException e) {
            throw new RestoreRefused(Reason.MALFORMED, "attributes: " + e.getClass().getSimpleName());
        }
    }

    /**
     * The serialized size of one attribute alone; -1 if it cannot be serialized.
     *
     * @throws IOException if it fails for another reason than not being Serializable
     */
    static int size(String name, Object value) throws IOException {
        try {
            return serialize(Collections.singletonMap(name, value)).length;
        } catch (NotSerializableException e) {
            return -1;
        }
    }

    /** The bytes of a session without attributes. */
    static byte[] none() {
        try {
            return serialize(Map.of());
        } catch (IOException e) {
            throw new IllegalStateException("serializing nothing failed", e);
        }
    }

    private static byte[] serialize(Map<String, Object> values) throws IOException {
        ByteArrayOutputStream bytes = new ByteArrayOutputStream(512);
        try (ObjectOutputStream out = new ObjectOutputStream(bytes)) {
            out.writeInt(values.size());
            for (Map.Entry<String, Object> entry : values.entrySet()) {
                out.writeUTF(entry.getKey());
                out.writeObject(entry.getValue());
            }
        }
        return bytes.toByteArray();
    }

    /** Builds the allow-list: safe JDK value types, plus the app's own pattern if given (arrays of both). */
    static Pattern allowList(String appClasses) {
        String classes = DEFAULT_CLASSES + (appClasses == null || appClasses.isBlank() ? "" : "|" + appClasses);
        return Pattern.compile("(?:" + classes + ")|\\[+L(?:" + classes + ");|\\[+[BCDFIJSZ]");
    }

    /**
     * JDK classes that hold values and run no code of an attacker's choosing
     * when deserialized (their readObject only rebuilds the value).
     */
    static final String DEFAULT_CLASSES = String.join("|",
            "java\\.lang\\.(?:Boolean|Byte|Character|Short|Integer|Long|Float|Double|Number|String|Enum)",
            "java\\.math\\.(?:BigInteger|BigDecimal)",
            "java\\.util\\.(?:ArrayList|LinkedList|ArrayDeque|HashMap|LinkedHashMap|TreeMap|HashSet|LinkedHashSet"
                    + "|TreeSet|Date|UUID|Locale|Currency|CollSer|Arrays\\$ArrayList"
                    + "|Collections\\$(?:Unmodifiable|Synchronized|Empty|Singleton)\\w*)",
            "java\\.time\\.Ser");
}
